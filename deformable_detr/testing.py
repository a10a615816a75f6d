"""The oracle for tests and checks, as transformers.testing_utils is for transformers: transformers' own Deformable
DETR (DeformableDetrForObjectDetection) built with random, perturbed weights, in the variants and layouts that ours
must match or convert from.

The tests (tests/) and the scripts that compare ours with transformers (scripts/benchmark.py, scripts/gpu_check.py)
import it; the library never does. It is no part of the model's code: no module of the Hub set (the files that
save_pretrained copies beside the weights) imports it, so a saved model never holds it. It needs transformers'
ResNet and Deformable DETR classes and safetensors, which are dependencies of this package anyway.
"""

import json
import os
import re
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import DeformableDetrConfig as HFConfig
from transformers import DeformableDetrForObjectDetection as HFModel
from transformers import ResNetConfig

from .engine.options import CONFIG_PRESETS
from .model.transformers_mapping import SHARED_CONFIG_FIELDS

__all__ = [
    "RESNET50_LIKE",
    "VARIANTS",
    "full_size_pair",
    "hub_v4_state_dict",
    "padded_batch",
    "perturb_",
    "resnet50_hf_model",
    "small_hf_config",
    "small_hf_model",
    "torchvision_name",
    "untie_class_heads_",
]

VARIANTS = {
    "multi-scale": {},
    "single-scale": {"num_feature_levels": 1},
    "box-refine": {"with_box_refine": True},
    "two-stage": {"with_box_refine": True, "two_stage": True},
    "learned-positions": {"position_embedding_type": "learned"},
}


# the training preset "tiny" as the oracle changes it: narrower, a few queries and labels, and heads and sampling
# points that differ between the encoder and the decoder, so that a mix-up of the two shows
ORACLE_SIZES = dict(
    d_model=64,
    encoder_ffn_dim=96,
    decoder_ffn_dim=96,
    encoder_attention_heads=4,
    decoder_attention_heads=8,
    num_queries=12,
    two_stage_num_proposals=12,
    num_labels=5,
    encoder_n_points=3,
    decoder_n_points=2,
)


def small_hf_config(num_feature_levels=4, **overrides):
    """transformers' config of the "tiny" preset (CONFIG_PRESETS) with ORACLE_SIZES, on a small transformers ResNet
    (basic blocks) in place of the built-in ResNet-18."""
    out_features = ["stage2", "stage3", "stage4"] if num_feature_levels > 1 else ["stage4"]
    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )
    preset = {name: value for name, value in CONFIG_PRESETS["tiny"].items() if name in SHARED_CONFIG_FIELDS}
    fields = preset | ORACLE_SIZES | dict(use_timm_backbone=False, backbone_config=backbone)
    return HFConfig(**(fields | {"num_feature_levels": num_feature_levels} | overrides))


@torch.no_grad()
def perturb_(model, seed=0, scale=0.1):
    """Adds noise to every parameter and buffer, so no zero or identity initialisation hides a mistake."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator) * scale
        if "running_var" in name:
            tensor.copy_(1.0 + noise.abs())
        else:
            tensor.add_(noise)
    return model


def untie_class_heads_(model):
    """transformers ties every class_embed.i to class_embed.0, also with box refinement, where the paper's
    layers have a head each: give each layer its own weights, so that the per-layer mapping is tested."""
    if model.config.with_box_refine:
        copies = model.model.decoder.class_embed if model.config.two_stage else [None] * len(model.class_embed)
        for head, copy in zip(model.class_embed, copies):
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            head.bias = torch.nn.Parameter(head.bias.detach().clone())
            if copy is not None:  # two-stage: the decoder holds the same heads
                copy.weight, copy.bias = head.weight, head.bias
    return model


def small_hf_model(variant="multi-scale", seed=0, **overrides):
    """transformers' small Deformable DETR (small_hf_config) of a VARIANTS entry, untied and perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = untie_class_heads_(HFModel(small_hf_config(**VARIANTS[variant], **overrides)))
    return perturb_(model, seed).eval()


RESNET50_LIKE = dict(
    embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck"
)


def resnet50_hf_model(variant="multi-scale", seed=0):
    """A small transformer on transformers' ResNet-50 (the architecture of timm's and torchvision's)."""
    levels = VARIANTS[variant].get("num_feature_levels", 4)
    out_features = ["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"]
    backbone = ResNetConfig(**RESNET50_LIKE, out_features=out_features)
    return small_hf_model(variant, seed, backbone_config=backbone)


def torchvision_name(hf_resnet_key: str) -> str:
    """transformers' ResNet parameter name -> torchvision's (as in timm and the paper's checkpoints)."""
    key = hf_resnet_key.replace("embedder.embedder.convolution", "conv1").replace(
        "embedder.embedder.normalization", "bn1"
    )
    match = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", key)
    if match:
        stage, block, rest = match.groups()
        rest = re.sub(r"^shortcut\.convolution", "downsample.0", rest)
        rest = re.sub(r"^shortcut\.normalization", "downsample.1", rest)
        rest = re.sub(r"^layer\.(\d+)\.convolution", lambda m: f"conv{int(m.group(1)) + 1}", rest)
        rest = re.sub(r"^layer\.(\d+)\.normalization", lambda m: f"bn{int(m.group(1)) + 1}", rest)
        key = f"layer{int(stage) + 1}.{block}.{rest}"
    return key


def hub_v4_state_dict(hf_model):
    """The state dict of a transformers v5 model on a ResNet-50, laid out as the SenseTime/deformable-detr*
    checkpoints are: timm (torchvision) names under model.backbone.conv_encoder.model., fc1/fc2, out_proj."""
    out = {}
    for key, value in hf_model.state_dict().items():
        if key.startswith("model.backbone.model."):
            key = "model.backbone.conv_encoder.model." + torchvision_name(key[len("model.backbone.model.") :])
        key = re.sub(r"\.mlp\.fc([12])\.", r".fc\1.", key).replace("self_attn.o_proj", "self_attn.out_proj")
        key = key.replace("model.position_embedding.", "model.backbone.position_embedding.")
        out[key] = value.clone()
    return out


def padded_batch(seed=0):
    """Two images of different sizes, padded bottom-right to 96x128, with their pixel mask."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(2, 3, 96, 128)
    pixel_mask = torch.zeros(2, 96, 128, dtype=torch.long)
    pixel_values[0] = torch.randn(3, 96, 128, generator=generator)
    pixel_mask[0] = 1
    pixel_values[1, :, :70, :100] = torch.randn(3, 70, 100, generator=generator)
    pixel_mask[1, :70, :100] = 1
    return pixel_values, pixel_mask


def full_size_pair(device):
    """transformers' full-size Deformable DETR on a ResNet-50 and ours converted from it, as the SenseTime Hub
    checkpoints convert: through their layout (timm names), onto our built-in ResNet-50. Both train the same
    parameters."""
    torch.manual_seed(0)
    backbone = ResNetConfig(**RESNET50_LIKE, out_features=["stage2", "stage3", "stage4"])
    hf = perturb_(
        HFModel(HFConfig(use_timm_backbone=False, backbone_config=backbone, num_labels=91, auxiliary_loss=True)),
        scale=0.01,
    )
    with tempfile.TemporaryDirectory() as folder:
        config = hf.config.to_dict()
        config.pop("backbone_config")
        config.update(use_timm_backbone=True, backbone="resnet50")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        save_file(
            {k: v.contiguous() for k, v in hub_v4_state_dict(hf).items()}, os.path.join(folder, "model.safetensors")
        )
        from .weights.conversion import from_transformers

        ours = from_transformers(folder)
    # both train their backbone from layer2 on, as in the paper, and as transformers does with a timm ResNet; with
    # its own ResNet a name check looks for "stage.1" in "encoder.stages.1..." and freezes all of it
    for name, parameter in hf.model.backbone.named_parameters():
        parameter.requires_grad_(any(f".stages.{i}." in name for i in (1, 2, 3)))
    return hf.to(device), ours.to(device)


def synthetic_coco(images=5000, detections_per_image=100, classes=20, seed=0):
    """A COCO ground truth (7 boxes per image, 1-based annotation ids as pycocotools needs) and detections: most
    boxes found with some noise, the rest of the detections random."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in range(classes)]}
    detections = []
    for image in range(images):
        gt["images"].append({"id": image, "width": 640, "height": 480})
        boxes = [(rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(5, 140), rng.uniform(5, 100)) for _ in range(7)]
        for x, y, w, h in boxes:
            category = int(rng.integers(classes))
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            if rng.random() < 0.7:
                noisy = [
                    x + rng.normal(0, 4),
                    y + rng.normal(0, 4),
                    w * rng.uniform(0.8, 1.2),
                    h * rng.uniform(0.8, 1.2),
                ]
                detections.append({"image_id": image, "category_id": category, "bbox": noisy, "score": rng.random()})
        while len(detections) < (image + 1) * detections_per_image:
            box = [rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(5, 140), rng.uniform(5, 100)]
            detections.append(
                {"image_id": image, "category_id": int(rng.integers(classes)), "bbox": box, "score": rng.random()}
            )
    return gt, detections
