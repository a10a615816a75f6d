"""Ours against transformers' DeformableDetrForObjectDetection with the same weights (fp32, eval)."""

import argparse
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from deformable_detr import DeformableDetrForObjectDetection, from_original_checkpoint, from_transformers
from deformable_detr.testing import (
    VARIANTS,
    hub_v4_state_dict,
    padded_batch,
    resnet50_hf_model,
    small_hf_model,
    torchvision_name,
)

TOLERANCE = 1e-4


def max_differences(hf, ours):
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        theirs = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
        mine = ours(pixel_values, pixel_mask)
    return (theirs.logits - mine.logits).abs().max().item(), (theirs.pred_boxes - mine.pred_boxes).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_outputs_as_transformers(variant):
    hf = small_hf_model(variant)
    ours = from_transformers(hf)
    logits_diff, boxes_diff = max_differences(hf, ours)
    print(f"{variant}: logits {logits_diff:.2e} boxes {boxes_diff:.2e}")
    assert logits_diff <= TOLERANCE and boxes_diff <= TOLERANCE


@pytest.mark.parametrize("variant", ["multi-scale", "two-stage"])
def test_hidden_states_as_in_transformers(variant):
    """The encoder's and decoder's inputs, then every layer's output; asked for by argument or by the config."""
    hf = small_hf_model(variant)
    ours = from_transformers(hf)
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        theirs = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, output_hidden_states=True)
        ours.config.output_hidden_states = True
        mine = ours(pixel_values, pixel_mask)
    for name in ("encoder_hidden_states", "decoder_hidden_states"):
        assert len(getattr(mine, name)) == len(getattr(theirs, name)) == 3, name
        for a, b in zip(getattr(theirs, name), getattr(mine, name)):
            assert (a - b).abs().max() <= TOLERANCE, name


def test_padding_changes_the_output_as_in_transformers():
    """The padded image's result depends on its mask: a test that would fail if masks were ignored."""
    hf = small_hf_model("multi-scale")
    ours = from_transformers(hf)
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        masked = ours(pixel_values, pixel_mask).logits[1]
        unmasked = ours(pixel_values).logits[1]
    assert (masked - unmasked).abs().max() > 1e-3


def test_saved_transformers_folder_converts(tmp_path):
    hf = small_hf_model("two-stage")
    hf.save_pretrained(tmp_path)
    ours = from_transformers(str(tmp_path))
    assert max(max_differences(hf, ours)) <= TOLERANCE
    # from_pretrained converts it too, through transformers' weight-conversion mapping
    assert max(max_differences(hf, DeformableDetrForObjectDetection.from_pretrained(tmp_path))) <= TOLERANCE


def test_what_from_transformers_cannot_take_is_named(tmp_path):
    """A folder that is not here, a model of ours, and transformers' bare model (no heads) are each named."""
    with pytest.raises(FileNotFoundError, match="no-such-folder: no such folder"):
        from_transformers(str(tmp_path / "no-such-folder"))
    hf = small_hf_model("multi-scale")
    with pytest.raises(
        ValueError, match="got a DeformableDetrForObjectDetection \\(model_type 'hub_deformable_detr'\\)"
    ):
        from_transformers(from_transformers(hf))
    with pytest.raises(ValueError, match="DeformableDetrModel has no class heads"):
        from_transformers(hf.model)


@pytest.mark.parametrize("variant", ["multi-scale", "box-refine"])
def test_hub_checkpoint_layout_converts_onto_builtin_resnet50(tmp_path, variant):
    """A folder laid out like SenseTime/deformable-detr*: v4 config (use_timm_backbone, backbone='resnet50')
    and timm/torchvision names under model.backbone.conv_encoder.model.; every key must map, and the
    built-in ResNet-50 must give transformers' outputs."""
    hf = resnet50_hf_model(variant)
    config = hf.config.to_dict()
    config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone="resnet50")
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = hub_v4_state_dict(hf)
    assert any(k.startswith("model.backbone.conv_encoder.model.layer4.2.conv3") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    ours = from_transformers(str(tmp_path))
    assert ours.config.backbone == "resnet50" and ours.config.backbone_config is None
    assert max(max_differences(hf, ours)) <= TOLERANCE


def test_an_unmapped_key_is_an_error(tmp_path):
    hf = small_hf_model("multi-scale")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    state["model.something_new.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.something_new.weight"):
        from_transformers(str(tmp_path))


def original_layout(hf_model):
    """transformers v5 names -> the fundamentalvision/Deformable-DETR names (written independently of ours)."""
    out = {}
    state = hf_model.state_dict()
    for key, value in state.items():
        if key.startswith("model.backbone.model."):
            key = "backbone.0.body." + torchvision_name(key[len("model.backbone.model.") :])
        elif key.startswith(("class_embed", "bbox_embed")):
            pass
        elif key.startswith("model.decoder.bbox_embed") or key.startswith("model.decoder.class_embed"):
            key = key.replace("model.decoder.", "transformer.decoder.")
        elif key == "model.query_position_embeddings.weight":
            key = "query_embed.weight"
        elif key.startswith("model.input_proj"):
            key = key[len("model.") :]
        else:
            key = key.replace("model.", "transformer.", 1)
            enc = re.match(r"transformer\.encoder\.layers\.(\d+)\.(.*)$", key)
            dec = re.match(r"transformer\.decoder\.layers\.(\d+)\.(.*)$", key)
            if enc:
                i, rest = enc.groups()
                rest = rest.replace("self_attn_layer_norm", "norm1").replace("final_layer_norm", "norm2")
                rest = rest.replace("mlp.fc1", "linear1").replace("mlp.fc2", "linear2")
                key = f"transformer.encoder.layers.{i}.{rest}"
            if dec:
                i, rest = dec.groups()
                rest = rest.replace("encoder_attn_layer_norm", "norm1").replace("self_attn_layer_norm", "norm2")
                rest = rest.replace("final_layer_norm", "norm3").replace("encoder_attn.", "cross_attn.")
                rest = (
                    rest.replace("mlp.fc1", "linear1")
                    .replace("mlp.fc2", "linear2")
                    .replace("self_attn.o_proj", "self_attn.out_proj")
                )
                key = f"transformer.decoder.layers.{i}.{rest}"
        out[key] = value.clone()
    for key in [k for k in out if ".self_attn.q_proj." in k]:
        prefix, kind = re.match(r"(.*\.self_attn)\.q_proj\.(weight|bias)", key).groups()
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([out.pop(f"{prefix}.{p}_proj.{kind}") for p in "qkv"])
    return out


@pytest.mark.parametrize("variant", ["multi-scale", "two-stage"])
def test_original_checkpoint_converts(tmp_path, variant):
    hf = resnet50_hf_model(variant)
    c = hf.config
    args = argparse.Namespace(
        backbone="resnet50",
        dilation=False,
        num_queries=c.num_queries,
        hidden_dim=c.d_model,
        nheads=c.encoder_attention_heads,
        enc_layers=c.encoder_layers,
        dec_layers=c.decoder_layers,
        dim_feedforward=c.encoder_ffn_dim,
        num_feature_levels=c.num_feature_levels,
        enc_n_points=c.encoder_n_points,
        dec_n_points=c.decoder_n_points,
        with_box_refine=c.with_box_refine,
        two_stage=c.two_stage,
        dropout=0.1,
        position_embedding="sine",
    )
    torch.save({"model": original_layout(hf), "args": args}, tmp_path / "checkpoint.pth")
    # the paper's decoder has as many heads as the encoder: transformers' small config does not, so override
    ours = from_original_checkpoint(tmp_path / "checkpoint.pth", decoder_attention_heads=c.decoder_attention_heads)
    assert ours.config.num_labels == c.num_labels
    assert max(max_differences(hf, ours)) <= TOLERANCE
