"""Construction, initialisation and bad input."""

import math

import pytest
import torch

from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection, load_backbone_weights
from deformable_detr.model.deformable_transformer import refine_boxes
from tests.support.models import tiny_model


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
def test_any_number_of_feature_levels(levels):
    model = tiny_model(num_feature_levels=levels)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out.logits.shape == (1, 7, 3) and out.pred_boxes.shape == (1, 7, 4)
    assert len(model.model.input_proj) == levels
    assert 0 <= out.pred_boxes.min() and out.pred_boxes.max() <= 1


@pytest.mark.parametrize(
    "variant",
    [
        dict(with_box_refine=True),
        dict(with_box_refine=True, two_stage=True),
        dict(position_embedding_type="learned"),
        dict(dilation=True),
        dict(decoder_layers=1),
        dict(encoder_layers=0),
    ],
)
def test_variants_run_and_give_finite_outputs(variant):
    model = tiny_model(**variant)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 128))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.pred_boxes).all()
    if variant.get("two_stage"):
        assert (
            out.enc_outputs_class.shape[:2]
            == out.enc_outputs_coord_logits.shape[:2]
            == out.encoder_last_hidden_state.shape[:2]
        )


@pytest.mark.parametrize("variant", [dict(), dict(with_box_refine=True, two_stage=True)])
def test_prediction_heads_run_in_full_precision_under_autocast(variant):
    """Scores and box deltas are not rounded to bf16 under autocast: the heads give what they give in fp32 on the
    same hidden states (and two-stage proposals are ranked on fp32 scores)."""
    model = tiny_model(**variant)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.logits.dtype == torch.float32
    if variant:
        assert out.enc_outputs_class.dtype == out.enc_outputs_coord_logits.dtype == torch.float32
    hidden = out.intermediate_hidden_states[:, -1].float()
    with torch.no_grad():
        assert torch.equal(out.logits, model.class_head(1)(hidden))
        delta = model.box_head(1)(hidden)
    assert torch.equal(out.pred_boxes, refine_boxes(out.intermediate_reference_points[:, 0], delta))


@pytest.mark.parametrize("reference", [2, 4])
def test_decoder_layers_run_in_full_precision_under_autocast_but_for_the_values(reference, monkeypatch):
    """Under bf16 autocast a decoder layer projects the encoder's memory (S rows) in bf16, and does all the rest
    (Q rows) as in fp32: given the same bf16 values, it gives what fp32 gives, bit for bit."""
    layer = tiny_model().model.decoder.layers[0]
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)][: layer.cross_attn.n_levels]
    C, S = layer.ffn_norm.normalized_shape[0], sum(h * w for h, w in shapes)
    tgt, query_pos, memory = (
        torch.randn(2, 7, C, generator=g),
        torch.randn(2, 7, C, generator=g),
        torch.randn(2, S, C, generator=g),
    )
    points = torch.rand(2, 7, len(shapes), reference, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(tgt, query_pos, points, memory, shapes, None)[0]
        values = layer.cross_attn.project_values(memory)
    assert values.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    monkeypatch.setattr(layer.cross_attn, "project_values", lambda *args: values.float())
    with torch.no_grad():
        assert torch.equal(mixed, layer(tgt, query_pos, points, memory, shapes, None)[0])


def test_dc5_halves_the_last_stride():
    plain, dc5 = tiny_model().model.backbone, tiny_model(dilation=True).model.backbone
    assert plain.strides == [8, 16, 32] and dc5.strides == [8, 16, 16]


def test_paper_initialisation():
    model = tiny_model()
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(model.class_embed.bias, torch.full((3,), prior))
    last = model.bbox_embed.layers[-1]
    assert (last.weight == 0).all() and last.bias.tolist() == [0, 0, -2, -2]
    attn = model.model.encoder.layers[0].self_attn
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()
    # head 0 points along +x at distances 1..K, head M/4 along +y
    offsets = attn.sampling_offsets.bias.view(4, 4, 4, 2)  # (M, L, K, 2)
    assert offsets[0, 0, :, 0].tolist() == [1, 2, 3, 4] and offsets[0, 0, :, 1].abs().max() < 1e-6
    assert torch.allclose(offsets[1, 2, :, 1], torch.tensor([1.0, 2, 3, 4]))
    # at init the boxes are the reference points, with the same small size everywhere
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert torch.allclose(out.pred_boxes[..., :2], out.init_reference_points, atol=1e-6)
    assert torch.allclose(out.pred_boxes[..., 2:], torch.sigmoid(torch.tensor(-2.0)).expand(1, 7, 2))


def test_the_backbone_stem_and_first_stage_are_frozen(tmp_path):
    """Also in a model loaded back (and so when fine-tuning a saved one), whose parameters loading makes anew."""
    fresh = tiny_model()
    fresh.save_pretrained(tmp_path)
    for model in (fresh, DeformableDetrForObjectDetection.from_pretrained(tmp_path)):
        trainable = {n for n, p in model.model.backbone.body.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(("layer2", "layer3", "layer4")) for n in trainable)
        assert not any("running_mean" in n for n, _ in model.named_parameters())


def test_without_box_refinement_one_head_serves_every_layer():
    model = tiny_model(auxiliary_loss=True)
    keys = [k for k in model.state_dict() if "class_embed" in k or "bbox_embed" in k]
    assert sorted(keys) == sorted(
        ["class_embed.weight", "class_embed.bias"]
        + [f"bbox_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    )


def test_building_never_touches_the_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access while building a model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    tiny_model(backbone="resnet50")


def test_backbone_weights_load_from_a_torchvision_style_file(tmp_path):
    source = tiny_model().model.backbone.body
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # the ImageNet classifier is ignored
    torch.save(state, tmp_path / "resnet18.pth")
    model = tiny_model()
    load_backbone_weights(model, str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.model.backbone.body.conv1.weight, state["conv1.weight"])


def test_backbone_weights_that_cannot_be_had_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="no-such-user/no-such-resnet"):
        load_backbone_weights(tiny_model(), "no-such-user/no-such-resnet")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        load_backbone_weights(tiny_model(), str(tmp_path / "partial.pth"))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=96, encoder_attention_heads=5), "divisible by encoder_attention_heads"),
        (dict(d_model=48), "multiple of 32"),
        (dict(backbone="resnet27"), "resnet27"),
        (dict(two_stage=True), "with_box_refine"),
        (dict(num_feature_levels=6), "num_feature_levels"),
        (dict(position_embedding_type="rope"), "position_embedding_type"),
        (dict(decoder_layers=0), "decoder_layers"),
        (dict(dropout=1.5), "dropout"),
        (dict(d_model=0), "d_model must be a positive multiple of 32 .*got 0"),
        (dict(activation_function="gelux"), "activation_function 'gelux' is not one of"),
        (dict(num_queries=3.5), "num_queries must be an integer, got 3.5"),
        (dict(encoder_layers="6"), "encoder_layers must be an integer, got '6'"),
        (dict(num_labels=0), "num_labels must be at least 1"),
        (dict(focal_alpha=-0.25), r"focal_alpha must be in \[0, 1\]"),
        (dict(giou_cost=-2.0), "giou_cost must be at least 0"),
    ],
)
def test_a_config_that_cannot_work_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DeformableDetrConfig(**fields)


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="4 channels.*expects 3"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        model(torch.randn(2, 3, 64, 64), torch.ones(2, 32, 64))
    # a canvas thinner than the coarsest stride (64), such as a thin image alone in its batch in detect and
    # evaluate: padded and masked up to it, as a batch with a larger image pads it
    thin = torch.randn(1, 3, 40, 300)
    padded, mask = torch.zeros(1, 3, 64, 300), torch.zeros(1, 64, 300, dtype=torch.long)
    padded[..., :40, :], mask[:, :40] = thin, 1
    with torch.no_grad():
        alone, in_a_batch = model(thin), model(padded, mask)
    assert torch.equal(alone.logits, in_a_batch.logits) and torch.equal(alone.pred_boxes, in_a_batch.pred_boxes)
    with pytest.raises(ValueError, match=r"no real pixel in image\(s\) \[1\]"):
        mask = torch.ones(2, 64, 64)
        mask[1] = 0
        model(torch.randn(2, 3, 64, 64), mask)
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="pixel_values must be a floating-point tensor .*got torch.uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel_values is torch.float64 but the model's weights are torch.float32"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="pixel_values holds no image"):
        model(torch.zeros(0, 3, 64, 64))
    two_stage = tiny_model(with_box_refine=True, two_stage=True, two_stage_num_proposals=500, num_feature_levels=1)
    with pytest.raises(ValueError, match="two_stage_num_proposals=500"):
        two_stage(torch.randn(1, 3, 64, 64))


def test_set_labels_keeps_the_heads_type_and_refuses_bad_names():
    model = tiny_model(with_box_refine=True, two_stage=True).to(torch.bfloat16)
    model.set_labels(["cat", "dog"])  # new heads in the model's bf16, so that the forward runs
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).logits.shape == (1, 7, 2)
    assert model.config.id2label == {0: "cat", 1: "dog"}
    for names, message in (
        ("cat", "must be a list of strings, got 'cat'"),
        ([], "class_names is empty"),
        (["a", "b", "a"], "has 'a' more than once"),
        (["a", 2], "must be a list of strings"),
    ):
        with pytest.raises(ValueError, match=message):
            model.set_labels(names)
    assert model.config.id2label == {0: "cat", 1: "dog"}  # unchanged by the refusals
