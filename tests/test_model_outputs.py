"""What transformers' Deformable DETR takes and gives, ours too: attentions, eager/sdpa self-attention, the decoder's
attention mask, reused encoder outputs, inputs_embeds / decoder_inputs_embeds, the backbone sub-config."""

from unittest import mock

import pytest
import torch
from transformers import ResNetConfig
from transformers.modeling_outputs import BaseModelOutput

from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection, from_transformers
from deformable_detr.model import modeling_deformable_detr as modeling
from deformable_detr.testing import padded_batch, small_hf_model
from tests.support.models import tiny_model

IMAGES = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["multi-scale", "two-stage"])
def test_attentions_as_in_transformers(variant):
    """Every layer's encoder, decoder and cross-attention weights, with transformers' shapes, within 1e-5 (fp32)."""
    hf = small_hf_model(variant)
    ours = from_transformers(hf)
    hf.set_attn_implementation("eager")  # its sdpa gives no weights
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        theirs = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, output_attentions=True)
        mine = ours(pixel_values, pixel_mask, output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert len(getattr(mine, name)) == len(getattr(theirs, name)) == 2, name
        for a, b in zip(getattr(theirs, name), getattr(mine, name)):
            assert a.shape == b.shape, name
            assert (a - b).abs().max() <= 1e-5, name
    M, Q = hf.config.decoder_attention_heads, hf.config.num_queries
    assert mine.decoder_attentions[0].shape == (2, M, Q, Q)
    assert mine.cross_attentions[0].shape[1:] == (Q, M, hf.config.num_feature_levels, hf.config.decoder_n_points)


def test_attentions_by_the_config_and_not_by_default():
    model = tiny_model()
    model.set_attn_implementation("eager")  # transformers' config refuses output_attentions with "sdpa"
    with torch.no_grad():
        plain = model(IMAGES)
        model.config.output_attentions = True
        asked = model(IMAGES)
    assert plain.encoder_attentions is None and plain.decoder_attentions is None and plain.cross_attentions is None
    assert len(asked.encoder_attentions) == 1 and len(asked.decoder_attentions) == len(asked.cross_attentions) == 2
    # each query's (or position's) weights sum to 1 over its keys
    assert torch.allclose(asked.decoder_attentions[0].sum(-1), torch.ones(()), atol=1e-6)
    assert torch.allclose(asked.encoder_attentions[0].flatten(-2).sum(-1), torch.ones(()), atol=1e-6)
    assert torch.equal(plain.logits, asked.logits)


def test_attention_gradients_reach_the_returned_weights():
    """The weights returned are those the outputs were computed from (the fused kernel is differentiable in them)."""
    model = tiny_model()
    out = model(IMAGES, output_attentions=True, output_hidden_states=True)
    held = [out.encoder_attentions[0], out.decoder_attentions[0], out.cross_attentions[0]]
    for weights in held:
        weights.retain_grad()
    out.logits.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in held)


def test_sdpa_runs_scaled_dot_product_attention_and_matches_eager():
    model = tiny_model(num_queries=9)
    assert model.config._attn_implementation == "sdpa"  # the default where it is supported
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad(), mock.patch("torch.nn.functional.scaled_dot_product_attention", side_effect=sdpa) as calls:
        fused = model(IMAGES)
        assert calls.call_count == 2  # one per decoder layer
        model.set_attn_implementation("eager")
        eager = model(IMAGES)
        assert calls.call_count == 2
    assert model.config._attn_implementation == "eager"
    assert (fused.logits - eager.logits).abs().max() <= 1e-5
    assert (fused.pred_boxes - eager.pred_boxes).abs().max() <= 1e-5


def test_sdpa_asked_for_attentions_gives_the_eager_weights():
    model = tiny_model()
    with torch.no_grad():
        fused = model(IMAGES, output_attentions=True)
        model.set_attn_implementation("eager")
        eager = model(IMAGES, output_attentions=True)
    for a, b in zip(fused.decoder_attentions, eager.decoder_attentions):
        assert a is not None and (a - b).abs().max() <= 1e-6


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_decoder_attention_mask_hides_queries_from_the_self_attention(attn_implementation):
    model = tiny_model()
    model.set_attn_implementation(attn_implementation)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 3:] = 0
    with torch.no_grad():
        plain = model(IMAGES)
        all_ones = model(IMAGES, decoder_attention_mask=torch.ones(2, 7))
        masked = model(IMAGES, decoder_attention_mask=mask, output_attentions=True)
    assert (all_ones.logits - plain.logits).abs().max() <= 1e-6
    assert (masked.logits[0] - plain.logits[0]).abs().max() > 1e-3  # image 0's queries attend to fewer
    assert (masked.logits[1] - plain.logits[1]).abs().max() <= 1e-6  # image 1 is unmasked
    weights = masked.decoder_attentions[0]  # (B, M, Q, Q)
    assert weights[0, :, :, 3:].abs().max() == 0 and torch.allclose(weights[0].sum(-1), torch.ones(()), atol=1e-6)
    # a mask over anything but the queries (generic encoder-decoder code sends one over its "tokens") is ignored,
    # named in a warning, as are decoder_input_ids
    with mock.patch.object(modeling.logger, "warning_once") as warn, torch.no_grad():
        unmasked = model(IMAGES, decoder_attention_mask=mask[:, :5], decoder_input_ids=IMAGES)
    assert torch.equal(unmasked.logits, plain.logits)
    warned = " ".join(call.args[0] for call in warn.call_args_list)
    assert "decoder_attention_mask of shape (2, 5) is ignored" in warned and "decoder_input_ids is ignored" in warned


def test_encoder_outputs_are_reused_without_running_the_encoder():
    model = tiny_model(two_stage=True, with_box_refine=True)
    with torch.no_grad():
        full = model(IMAGES, output_hidden_states=True, output_attentions=True)
        encoded = BaseModelOutput(
            last_hidden_state=full.encoder_last_hidden_state,
            hidden_states=full.encoder_hidden_states,
            attentions=full.encoder_attentions,
        )
        with mock.patch.object(model.model.encoder, "forward", side_effect=AssertionError("the encoder ran")):
            reused = model(IMAGES, encoder_outputs=encoded, output_hidden_states=True, output_attentions=True)
            as_tuple = model(IMAGES, encoder_outputs=(full.encoder_last_hidden_state,))
            as_tensor = model(IMAGES, encoder_outputs=torch.zeros_like(full.encoder_last_hidden_state))
    assert torch.equal(reused.logits, full.logits) and torch.equal(as_tuple.pred_boxes, full.pred_boxes)
    assert reused.encoder_hidden_states is encoded.hidden_states
    assert reused.encoder_attentions is encoded.attentions
    assert (as_tensor.logits - full.logits).abs().max() > 1e-3  # the memory given is the one decoded
    with pytest.raises(ValueError, match="give encoder_outputs or inputs_embeds, not both"):
        model(IMAGES, encoder_outputs=encoded, inputs_embeds=torch.zeros_like(full.encoder_last_hidden_state))
    with pytest.raises(ValueError, match="encoder_outputs must have shape"):
        model(IMAGES, encoder_outputs=(full.encoder_last_hidden_state[:, 1:],))


def test_inputs_embeds_replace_the_flattened_features():
    model = tiny_model()
    with torch.no_grad():
        full = model(IMAGES, output_hidden_states=True)
        features = full.encoder_hidden_states[0]  # (B, S, C): the encoder's input
        same = model(IMAGES, inputs_embeds=features)
        other = model(IMAGES, inputs_embeds=features.flip(0))
    assert (same.logits - full.logits).abs().max() <= 1e-6
    # the features do the work, not the images: image 1's features give image 1's result in image 0's place
    assert (other.logits[0] - full.logits[1]).abs().max() <= 1e-5 < (other.logits[0] - full.logits[0]).abs().max()
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        model(IMAGES, inputs_embeds=features[:, :-1])


def test_inputs_embeds_train_the_level_and_position_embeddings():
    """With inputs_embeds only the backbone and its projections are left out of the graph: the encoder's position
    embeddings (learned rows and columns, level embeddings) still come from pixel_values and learn."""
    model = tiny_model(position_embedding_type="learned").train()
    with torch.no_grad():
        for layer in model.model.encoder.layers:  # zero at init: the queries (and positions) would not count yet
            for linear in (layer.self_attn.sampling_offsets, layer.self_attn.attention_weights):
                linear.weight.normal_(std=0.1)
        features = model.model(IMAGES, output_hidden_states=True).encoder_hidden_states[0]
    model(IMAGES, inputs_embeds=features.requires_grad_()).logits.sum().backward()
    for name in ("level_embed", "position_embedding.row_embed.weight", "position_embedding.col_embed.weight"):
        assert model.model.get_parameter(name).grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0
    assert model.model.input_proj[0][0].weight.grad is None  # replaced features: nothing to learn there


def test_decoder_inputs_embeds_are_the_queries():
    model = tiny_model()
    with torch.no_grad():
        full = model(IMAGES, output_hidden_states=True)
        queries = full.decoder_hidden_states[0]  # (B, Q, C)
        same = model(IMAGES, decoder_inputs_embeds=queries)
        zeros = model(IMAGES, decoder_inputs_embeds=torch.zeros_like(queries), output_hidden_states=True)
    assert torch.equal(same.logits, full.logits)
    assert (zeros.logits - full.logits).abs().max() > 1e-3 and zeros.decoder_hidden_states[0].abs().max() == 0
    with pytest.raises(ValueError, match="decoder_inputs_embeds must have shape"):
        model(IMAGES, decoder_inputs_embeds=queries[:, :3])


def test_unknown_keyword_arguments_are_refused_and_transformers_common_ones_accepted():
    model = tiny_model()
    with torch.no_grad():
        model(IMAGES, num_items_in_batch=torch.tensor(3))  # what transformers' Trainer passes
        with pytest.raises(TypeError, match="'pixel_musk'"):
            model(IMAGES, pixel_musk=torch.ones(2, 96, 128))


def test_tuple_outputs_follow_the_dict_order_with_attentions():
    model = tiny_model()
    with torch.no_grad():
        as_dict = model(IMAGES, output_attentions=True)
        as_tuple = model(IMAGES, output_attentions=True, return_dict=False)
    assert len(as_tuple) == len(as_dict) and torch.equal(as_tuple[-1][0], as_dict.encoder_attentions[0])


def test_backbone_config_is_a_sub_config():
    backbone = ResNetConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], out_features=["stage2", "stage3"])
    config = DeformableDetrConfig(
        backbone_config=backbone.to_dict(), d_model=32, encoder_layers=1, decoder_layers=1, num_queries=5,
        num_feature_levels=3, attn_implementation="eager",
    )  # fmt: skip
    assert config.sub_configs == {"backbone_config": type(config).sub_configs["backbone_config"]}
    assert config._attn_implementation == config.backbone_config._attn_implementation == "eager"
    config._attn_implementation = "sdpa"
    assert config.backbone_config._attn_implementation == "sdpa"
    assert DeformableDetrConfig(backbone="resnet18").backbone_config is None  # the built-in ResNet: no sub-config
    model = DeformableDetrForObjectDetection(DeformableDetrConfig(**{**config.to_dict(), "attn_implementation": None}))
    assert model.model.backbone.body.config is model.config.backbone_config  # the same object, not a copy
    assert model.config._attn_implementation == "sdpa" and model.config.backbone_config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown model_type 'nope'"):
        DeformableDetrConfig(backbone_config={"model_type": "nope"})
