"""transformers' own Deformable DETR checkpoints load with our from_pretrained, through transformers' weight-conversion
mapping (deformable_detr/transformers_mapping.py), and our saves go through its reverse."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.conversion_mapping import get_model_conversion_mapping

from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrModel
from deformable_detr.model.transformers_mapping import key_mapping
from deformable_detr.testing import VARIANTS, hub_v4_state_dict, padded_batch, resnet50_hf_model, small_hf_model
from deformable_detr.weights.loading import load_model
from tests.support.models import TINY, tiny_model

TOLERANCE = 1e-4


def max_difference(hf, ours) -> float:
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        theirs, mine = hf(pixel_values=pixel_values, pixel_mask=pixel_mask), ours(pixel_values, pixel_mask)
    return max((theirs.logits - mine.logits).abs().max().item(), (theirs.pred_boxes - mine.pred_boxes).abs().max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_pretrained_loads_a_transformers_folder(tmp_path, variant):
    """transformers' own saved folder loads with our from_pretrained: every key must land, none left random."""
    hf = small_hf_model(variant)
    hf.save_pretrained(tmp_path)
    ours, loading = DeformableDetrForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(loading[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert ours.config.model_type == "hub_deformable_detr" and ours.config.num_labels == hf.config.num_labels
    assert max_difference(hf, ours) <= TOLERANCE


def test_from_pretrained_loads_the_hub_v4_layout(tmp_path):
    """A folder laid out as SenseTime/deformable-detr-with-box-refine is: v4 config (timm resnet50), .bin weights with
    timm names under model.backbone.conv_encoder.model., fc1/fc2, out_proj, every layer's heads."""
    hf = resnet50_hf_model("box-refine")
    config = hf.config.to_dict()
    config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone="resnet50")
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = hub_v4_state_dict(hf)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours, loading = DeformableDetrForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(loading[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert ours.config.backbone == "resnet50" and ours.config.backbone_config is None
    assert max_difference(hf, ours) <= TOLERANCE
    # with timm's batch-norm step counters too: the strict loader the commands use takes it as well
    state["model.backbone.conv_encoder.model.bn1.num_batches_tracked"] = torch.tensor(7)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert max_difference(hf, load_model(str(tmp_path))) <= TOLERANCE


def test_config_kwargs_apply_to_the_converted_config(tmp_path):
    """As transformers applies them to a stored config: a new label set for fine-tuning."""
    small_hf_model("multi-scale").save_pretrained(tmp_path)
    ours = DeformableDetrForObjectDetection.from_pretrained(
        tmp_path, num_labels=2, ignore_mismatched_sizes=True, auxiliary_loss=False
    )
    assert ours.config.num_labels == 2 and ours.class_embed.weight.shape[0] == 2
    assert ours.config.id2label == {0: "LABEL_0", 1: "LABEL_1"} and ours.config.auxiliary_loss is False


def test_bare_model_loads_from_the_detector_folder(tmp_path):
    hf = small_hf_model("two-stage")
    hf.save_pretrained(tmp_path)
    ours, loading = DeformableDetrModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading["missing_keys"]
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        theirs = hf.model(pixel_values=pixel_values, pixel_mask=pixel_mask).last_hidden_state
        mine = ours(pixel_values, pixel_mask).last_hidden_state
    assert (theirs - mine).abs().max() <= TOLERANCE


@pytest.mark.parametrize("model_class", [DeformableDetrForObjectDetection, DeformableDetrModel])
def test_save_reverses_the_mapping_and_reloads(tmp_path, model_class):
    """What transformers' test_reverse_loading_mapping and test_can_load_from_already_mapped_keys check: a save
    writes transformers' names, every pattern of the mapping matches one of them, and both layouts reload exactly."""
    model = tiny_model(with_box_refine=True, two_stage=True)
    model = model if model_class is DeformableDetrForObjectDetection else model.model
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    assert conversions
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert any(key.endswith("decoder.layers.0.self_attn.q_proj.weight") for key in saved)
    assert not any(".ffn." in key or "in_proj" in key or "backbone.body" in key for key in saved)
    for conversion in conversions:
        matched = {match[2].lastgroup for key in saved if (match := conversion._scoped_match(key)) is not None}
        assert matched == {f"g{i}" for i in range(len(conversion.source_patterns))}, conversion
    model.save_pretrained(tmp_path / "ours", save_original_format=False)
    for folder in ("ours", "saved"):
        reloaded = model_class.from_pretrained(tmp_path / folder)
        assert reloaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    reloaded.save_pretrained(tmp_path / "again")  # loaded from transformers' names: saved in them again
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == saved.keys()


def test_a_loaded_transformers_checkpoint_saves_as_ours_does(tmp_path):
    """The config's head renames are not reversible: the save after such a load is the one of a model built here."""
    small_hf_model("box-refine").save_pretrained(tmp_path / "hf")
    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    fresh = DeformableDetrForObjectDetection(ours.config)
    fresh.save_pretrained(tmp_path / "fresh")
    assert (
        load_file(tmp_path / "ours" / "model.safetensors").keys()
        == load_file(tmp_path / "fresh" / "model.safetensors").keys()
    )
    reloaded = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), ours.state_dict().values()))


def test_original_checkpoint_heads_that_differ_are_named():
    """Without box refinement every layer's copy of the one head must hold the same weights."""
    from deformable_detr.weights.conversion import _renamed

    state = {"class_embed.0.weight": torch.zeros(2), "class_embed.1.weight": torch.ones(2)}
    renames = key_mapping(DeformableDetrConfig(**TINY))
    with pytest.raises(ValueError, match="class_embed.0.weight and class_embed.1.weight both give our class_embed"):
        _renamed(state, renames, "ckpt")


def test_a_checkpoint_in_our_names_saves_in_transformers_names(tmp_path):
    """A folder written in our own layer names (save_original_format=False) loads, and its next save writes
    transformers' names as any other: only out_proj's conversion matches our names, and a save reversing only the
    conversions that matched would mix the layouts (in_proj and self_attn_norm beside o_proj)."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "ours", save_original_format=False)
    model.save_pretrained(tmp_path / "fresh")
    DeformableDetrForObjectDetection.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "again")
    again, fresh = (load_file(tmp_path / folder / "model.safetensors") for folder in ("again", "fresh"))
    assert again.keys() == fresh.keys() and all(torch.equal(again[key], value) for key, value in fresh.items())
