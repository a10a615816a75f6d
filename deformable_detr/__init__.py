"""Deformable DETR as a first-class Hugging Face model."""

from transformers import AutoConfig, AutoModel, AutoModelForObjectDetection

from .configuration_deformable_detr import DeformableDetrConfig
from .ms_deform_attn import multi_scale_deformable_attention
from .modeling_deformable_detr import (
    DeformableDetrForObjectDetection,
    DeformableDetrModel,
    DeformableDetrPreTrainedModel,
)

__all__ = [
    "DeformableDetrConfig",
    "DeformableDetrForObjectDetection",
    "DeformableDetrModel",
    "DeformableDetrPreTrainedModel",
    "multi_scale_deformable_attention",
]

# (a) with this package installed, the Auto classes resolve our model_type to our classes;
# (b) save_pretrained writes `auto_map` and copies the code files, for trust_remote_code loading.
AutoConfig.register(DeformableDetrConfig.model_type, DeformableDetrConfig, exist_ok=True)
AutoModel.register(DeformableDetrConfig, DeformableDetrModel, exist_ok=True)
AutoModelForObjectDetection.register(DeformableDetrConfig, DeformableDetrForObjectDetection, exist_ok=True)
DeformableDetrConfig.register_for_auto_class()
DeformableDetrModel.register_for_auto_class("AutoModel")
DeformableDetrForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
