"""Deformable DETR as a first-class Hugging Face model."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection
from transformers.utils import logging as hf_logging

from .model.configuration_deformable_detr import DeformableDetrConfig
from .model.image_processing_deformable_detr import DeformableDetrImageProcessor
from .model.modeling_deformable_detr import (
    DeformableDetrForObjectDetection,
    DeformableDetrModel,
    DeformableDetrPreTrainedModel,
)
from .model.ms_deform_attn import multi_scale_deformable_attention
from .weights.backbone_weights import load_backbone_weights
from .weights.conversion import from_original_checkpoint, from_transformers

__all__ = [
    "DeformableDetrConfig",
    "DeformableDetrForObjectDetection",
    "DeformableDetrImageProcessor",
    "DeformableDetrModel",
    "DeformableDetrPreTrainedModel",
    "from_original_checkpoint",
    "from_transformers",
    "load_backbone_weights",
    "multi_scale_deformable_attention",
]

# (a) with this package installed, the Auto classes resolve our model_type to our classes;
# (b) save_pretrained writes `auto_map` and copies the code files, for trust_remote_code loading.
AutoConfig.register(DeformableDetrConfig.model_type, DeformableDetrConfig, exist_ok=True)
AutoModel.register(DeformableDetrConfig, DeformableDetrModel, exist_ok=True)
AutoModelForObjectDetection.register(DeformableDetrConfig, DeformableDetrForObjectDetection, exist_ok=True)
# ours serves both backends' names, so that use_fast=True (the example scripts' default) also gets ours.
# Registering makes transformers load its own image processors, and its DeformableDetrImageProcessor then warns
# that torchvision is missing, which is no concern of ours: keep that quiet
_verbosity = hf_logging.get_verbosity()
hf_logging.set_verbosity_error()
try:
    AutoImageProcessor.register(
        DeformableDetrConfig,
        image_processor_classes={"pil": DeformableDetrImageProcessor, "torchvision": DeformableDetrImageProcessor},
        exist_ok=True,
    )
finally:
    hf_logging.set_verbosity(_verbosity)
DeformableDetrConfig.register_for_auto_class()
DeformableDetrImageProcessor.register_for_auto_class("AutoImageProcessor")
DeformableDetrModel.register_for_auto_class("AutoModel")
DeformableDetrForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
