"""The README.md (model card) written beside a trained model: what it is, the data, its COCO metrics, how it
was made and how to load it."""

import os

from ..metrics.evaluation import format_metrics


def write_model_card(
    folder: str,
    config,
    metrics: dict | None,
    *,
    dataset: str,
    command: str,
    steps: int,
    skipped_steps: int,
    seconds: float,
    processes: int,
    model_id: str,
    methods: list[str] = (),
) -> str:
    """Writes `folder`/README.md and returns its path; its example loads `model_id` (the Hub repo or the folder);
    `methods`: the training-only methods the run used (training_methods)."""
    hub_dataset = "" if os.path.exists(dataset) else f"datasets:\n- {dataset}\n"
    results = "Not evaluated."
    if metrics is not None:
        results = f"COCO metrics on the validation split:\n\n```\n{format_metrics(metrics)}\n```"
    skipped = f", {counted(skipped_steps, 'step', 'steps')} skipped for a non-finite loss or gradient"
    text = f"""---
library_name: transformers
pipeline_tag: object-detection
tags:
- object-detection
- deformable-detr
{hub_dataset}---

{description(config, dataset if hub_dataset else os.path.basename(os.path.normpath(dataset)))}

## Results

{results}

## Training

{counted(steps, "optimiser step", "optimiser steps")} in {duration(seconds)} on \
{counted(processes, "process", "processes")}{skipped if skipped_steps else ""}.{used(methods)} Command:

```
{command}
```

## Use

```python
from transformers import pipeline

detector = pipeline("object-detection", model="{model_id}", trust_remote_code=True)
detector("image.jpg", threshold=0.5)
```
"""
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def description(config, dataset: str) -> str:
    """The card's title and first paragraph: the variant, the data and classes, the architecture's sizes."""
    classes = ", ".join(config.id2label[i] for i in range(config.num_labels))
    variant = ", ".join(
        name for name, on in (("two-stage", config.two_stage), ("box refinement", config.with_box_refine)) if on
    )
    backbone = config.backbone if config.backbone_config is None else config.backbone_config.model_type
    return f"""# Deformable DETR{f" ({variant})" if variant else ""}

Deformable DETR (Zhu et al., ICLR 2021) trained on `{dataset}` \
to detect {counted(config.num_labels, "class", "classes")}: {classes}.
Backbone {backbone}, \
d_model {config.d_model}, {config.encoder_layers} encoder and {config.decoder_layers} decoder layers, \
{config.num_queries} queries, {config.num_feature_levels} feature levels."""


def training_methods(options) -> list[str]:
    """The training-only methods a run's TrainingOptions used, in words for the card."""
    methods = []
    if options.hybrid_queries:
        methods.append(
            f"H-DETR's hybrid matching ({options.hybrid_queries} extra queries, each box repeated "
            f"{options.hybrid_repeats} times, loss weight {options.hybrid_loss_weight:g})"
        )
    if options.one_to_many_heads:
        methods.append(
            f"MS-DETR's one-to-many heads (each box repeated {options.one_to_many_repeats} times, loss weight "
            f"{options.one_to_many_loss_weight:g})"
        )
    if options.query_groups > 1:
        methods.append(f"Group DETR's query groups ({options.query_groups})")
    if options.classification_loss == "iou_aware":
        methods.append("the IoU-aware classification loss")
    return methods


def used(methods: list[str]) -> str:
    """The card's sentence on the training-only methods, or nothing."""
    if not methods:
        return ""
    listed = methods[0] if len(methods) == 1 else ", ".join(methods[:-1]) + " and " + methods[-1]
    return f" Trained with {listed}: training-only, they are no part of this model, a plain Deformable DETR."


def counted(number: int, one: str, many: str) -> str:
    """ "1 class", "3 classes"."""
    return f"{number} {one if number == 1 else many}"


def duration(seconds: float) -> str:
    """ "42 seconds", "1 minute", "12.5 minutes", "3.2 hours": the unit that reads best."""
    if seconds < 59.5:
        return counted(round(seconds), "second", "seconds")
    if seconds < 5940:
        minutes = round(seconds / 60, 1)
        return "1 minute" if minutes == 1 else f"{minutes:g} minutes"
    return f"{seconds / 3600:.1f} hours"
