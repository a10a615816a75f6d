"""Export to transformers' own format: a folder that plain transformers loads with no remote code, its
DeformableDetrForObjectDetection and DeformableDetrImageProcessor (`to_transformers`; `export_transformers` and the
`deformable-detr-export --format transformers` command for a saved model).

The weights are placed by the same mapping that loads transformers' checkpoints into ours (transformers_mapping.py):
every name of transformers' model is mapped to ours, so the two directions cannot disagree. Our built-in ResNets
(torchvision names) become transformers' own ResNet (ResNetConfig with `out_features`), which it builds without timm.
Before the folder is kept, transformers' model loaded from it is run against ours.
"""

import os
import re
import shutil
import time
import uuid
import warnings

import torch

from ..model.configuration_deformable_detr import RESNET_SPECS
from ..model.transformers_mapping import IN_PROJ_PARTS, SHARED_CONFIG_FIELDS, conversions, key_mapping
from ..utils.console import transformers_progress_bars_off
from .onnx_export import _example_inputs, max_abs_difference, refuse_an_export

TOLERANCE = 1e-4  # max abs difference of logits and boxes, fp32, transformers' model vs ours
BACKBONE = "model.backbone.model."


class ExportCheckError(ValueError):
    """transformers' model loaded from the export does not reproduce ours."""


def transformers_config(model):
    """transformers' DeformableDetrConfig of our detector `model`; ValueError naming what it cannot express."""
    from transformers import DeformableDetrConfig as TransformersConfig
    from transformers import ResNetConfig

    config = model.config
    if config.dilation:
        raise ValueError(
            "DC5 (dilation=True) cannot be exported to transformers' format: transformers dilates a ResNet only "
            "through timm (use_timm_backbone with output_stride=16), and its own ResNet (ResNetConfig), which it "
            "builds without timm, has no dilation"
        )
    if not config.freeze_backbone_batch_norms:
        warnings.warn(
            "freeze_backbone_batch_norms=False: transformers' Deformable DETR always freezes the backbone's batch "
            "norms; the export gives the same outputs, but fine-tuning it keeps their statistics fixed",
            stacklevel=3,
        )
    backbone = config.backbone_config
    if backbone is None:
        block, depths = RESNET_SPECS[config.backbone]
        widths = [64 * 2**stage * (4 if block == "bottleneck" else 1) for stage in range(4)]
        layers = model.model.backbone.out_indices  # 0-based ResNet layers; transformers' stage0 is the stem
        backbone = ResNetConfig(
            num_channels=config.num_channels,
            embedding_size=64,
            hidden_sizes=widths,
            depths=list(depths),
            layer_type=block,
            out_features=[f"stage{layer + 1}" for layer in layers],
        )
    fields = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS if name != "dilation"}
    for name, kind in TransformersConfig.__annotations__.items():  # its strict fields: whole matcher costs
        if kind is int and isinstance(fields.get(name), float):
            if not fields[name].is_integer():
                raise ValueError(f"{name}={fields[name]}: transformers' DeformableDetrConfig takes a whole number")
            fields[name] = int(fields[name])
    # every layer's head is written out: with box refinement each layer has its own class head, which transformers
    # would otherwise tie to the first layer's
    return TransformersConfig(**fields, use_timm_backbone=False, backbone_config=backbone, tie_word_embeddings=False)


def _torchvision_name(key: str) -> str:
    """transformers' ResNet parameter name -> torchvision's, as our built-in ResNets name them."""
    key = re.sub(r"^embedder\.embedder\.convolution\.", "conv1.", key)
    key = re.sub(r"^embedder\.embedder\.normalization\.", "bn1.", key)
    block = re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", key)
    if block is None:
        return key
    stage, index, rest = block.groups()
    rest = re.sub(r"^shortcut\.convolution\.", "downsample.0.", rest)
    rest = re.sub(r"^shortcut\.normalization\.", "downsample.1.", rest)
    rest = re.sub(r"^layer\.(\d+)\.convolution\.", lambda m: f"conv{int(m[1]) + 1}.", rest)
    rest = re.sub(r"^layer\.(\d+)\.normalization\.", lambda m: f"bn{int(m[1]) + 1}.", rest)
    return f"layer{int(stage) + 1}.{index}.{rest}"


def transformers_state_dict(model, names) -> dict:
    """Our detector's weights under transformers' `names` (its model's state-dict keys); ValueError naming a key of
    either side that the mapping leaves without a counterpart."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = [WeightRenaming(theirs, ours) for theirs, ours in key_mapping(model.config).items()] + conversions()
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    ours = model.state_dict()
    out, used = {}, set()
    for name in names:
        source = name
        if model.config.backbone_config is None and name.startswith(BACKBONE):
            source = BACKBONE + _torchvision_name(name[len(BACKBONE) :])
        key, fused = rename_source_key(source, renamings, converters)
        if key not in ours:
            raise ValueError(f"transformers' {name} has no counterpart in our model (mapped to {key})")
        value = ours[key]
        if fused is not None:  # one of q, k, v in the packed in_proj
            value = value.chunk(len(IN_PROJ_PARTS))[next(i for i, p in enumerate(IN_PROJ_PARTS) if p in fused)]
        out[name] = value.detach().clone()
        used.add(key)
    left = sorted(k for k in ours if k not in used and not k.endswith("num_batches_tracked"))
    if left:
        raise ValueError(f"our weights {left[:10]} have no place in transformers' model")
    return out


def transformers_processor(processor):
    """transformers' DeformableDetrImageProcessor with the settings of ours; ValueError for one it has not."""
    from transformers import DeformableDetrImageProcessor as TransformersProcessor

    fields = {k: v for k, v in processor.to_dict().items() if k not in ("auto_map", "image_processor_type")}
    relative_to = fields.pop("boxes_relative_to", "canvas")
    if relative_to != "canvas":
        raise ValueError(
            f"the image processor's boxes_relative_to={relative_to!r} cannot be exported: transformers' processor "
            "gives label boxes relative to the padded canvas ('canvas') only"
        )
    return TransformersProcessor.from_dict(fields)


def _check(model, folder: str) -> dict:
    """Max abs differences of logits and boxes, transformers' model loaded from `folder` vs ours (fp32), on one image
    and on a padded batch of two; ExportCheckError above TOLERANCE."""
    from transformers import DeformableDetrForObjectDetection as TransformersModel

    theirs = TransformersModel.from_pretrained(folder).eval()
    cases = {
        "1 image 160x224": _example_inputs(1, (160, 224), False, 1),
        "padded batch of 2, 192x160": _example_inputs(2, (192, 160), True, 2),
    }
    differences = {}
    for case, (pixel_values, pixel_mask) in cases.items():
        with torch.no_grad():
            differences[case] = max_abs_difference(
                theirs(pixel_values=pixel_values, pixel_mask=pixel_mask), model(pixel_values, pixel_mask)
            )
    worst = max(differences, key=differences.get)
    if not differences[worst] <= TOLERANCE:  # NaN fails too
        raise ExportCheckError(
            f"transformers' model loaded from the export differs from ours by {differences[worst]:.2e} on the "
            f"{worst} (tolerance {TOLERANCE:.0e}): {differences}"
        )
    return differences


@transformers_progress_bars_off()  # its save and the check's load: bars of a second
def to_transformers(model, output: str, processor=None, check: bool = True) -> dict:
    """Writes our detector `model` (and `processor`, ours, when given) to the folder `output` in transformers' own
    format; -> {"seconds", "max_abs_difference": {case: figure}} (empty without `check`). The folder is written
    beside `output` and renamed to it once checked, so a failed export leaves nothing there. ValueError for a model
    or processor transformers cannot express, or an `output` that is a file or a folder with files in it;
    ExportCheckError (a ValueError) when transformers' model loaded from the export is off by more than TOLERANCE."""
    from transformers import DeformableDetrForObjectDetection as TransformersModel

    if os.path.isfile(output) or os.path.isdir(output) and os.listdir(output):
        raise ValueError(f"output {output!r} exists and is not an empty folder")
    started = time.time()
    model = model.eval()
    theirs = TransformersModel(transformers_config(model)).eval()
    theirs.load_state_dict(transformers_state_dict(model, theirs.state_dict()), strict=True)
    hf_processor = None if processor is None else transformers_processor(processor)
    parent, name = os.path.split(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        theirs.save_pretrained(temporary)
        if hf_processor is not None:
            hf_processor.save_pretrained(temporary)
        differences = _check(model, temporary) if check else {}
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return {"seconds": round(time.time() - started, 1), "max_abs_difference": differences}


def export_transformers(model_path: str, output: str, check: bool = True) -> dict:
    """`to_transformers` of a saved model (ours or transformers', a folder or a Hub id) and its image processor."""
    from .detect import load_detector

    refuse_an_export(model_path)
    model, processor = load_detector(model_path, "cpu")
    return to_transformers(model, output, processor, check)
