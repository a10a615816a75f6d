"""Tiny models of ours for the tests: built in memory, saved as a detector, or as training overrides."""

import torch

from deformable_detr import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DeformableDetrImageProcessor,
    from_transformers,
)
from deformable_detr.engine.options import CONFIG_PRESETS

# the "tiny" preset, smaller still: one encoder layer, narrower, a few queries, the four feature levels of ours
TINY = CONFIG_PRESETS["tiny"] | dict(
    d_model=64,
    encoder_layers=1,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_queries=7,
    two_stage_num_proposals=7,
    num_feature_levels=4,
    num_labels=3,
)

# the training command's --config_overrides (on its "tiny" preset) of the tests that train
TINY_OVERRIDES = (
    "d_model=32,encoder_layers=1,decoder_layers=2,encoder_ffn_dim=64,decoder_ffn_dim=64,num_queries=10,"
    "encoder_attention_heads=2,decoder_attention_heads=2"
)


def tiny_model(**overrides):
    """Our model with the TINY config (and `overrides`), seeded, in eval mode."""
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(DeformableDetrConfig(**{**TINY, **overrides})).eval()


def saved_detector(folder):
    """A tiny model with BCCD's three labels and a processor for small images, saved in `folder`."""
    model = tiny_model(num_labels=3, id2label={0: "RBC", 1: "WBC", 2: "Platelets"})
    processor = DeformableDetrImageProcessor(size={"shortest_edge": 128, "longest_edge": 200})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def serve_transformers_checkpoint(hub, repo_id: str, folder) -> dict:
    """Puts transformers' small Deformable DETR (91 COCO-sized labels), saved in `folder`, on the fake Hub
    (tests/support/fake_hub.py) as `repo_id`; -> its weights converted to ours."""
    from transformers import DeformableDetrForObjectDetection as HFModel

    from deformable_detr.testing import perturb_, small_hf_config
    from tests.support.fake_hub import Repo

    perturb_(HFModel(small_hf_config(num_labels=91))).save_pretrained(folder)
    hub.repos[f"models/{repo_id}"] = Repo(private=False)
    hub.repos[f"models/{repo_id}"].commit({p.name: p.read_bytes() for p in folder.iterdir()}, "upload")
    return from_transformers(str(folder)).state_dict()
