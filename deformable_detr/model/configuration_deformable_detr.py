"""Configuration of Deformable DETR (Zhu et al., ICLR 2021).

Field names follow transformers' `DeformableDetrConfig`, so that its users feel at home; the
`model_type` is our own, so that both can be registered with the Auto classes side by side.
"""

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

# Built-in ResNets: name -> (block type, blocks per stage). Their parameter names are torchvision's.
RESNET_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

MAX_FEATURE_LEVELS = 5


class DeformableDetrConfig(PretrainedConfig):
    r"""
    Args:
        backbone: one of the built-in ResNets (`resnet18`, `resnet34`, `resnet50`, `resnet101`), used when
            `backbone_config` is None. Starts random; see `deformable_detr.load_backbone_weights`.
        backbone_config: a transformers backbone config (e.g. `ResNetConfig(out_features=[...])`), or its dict.
        dilation: DC5, i.e. replace the stride of the last ResNet stage by a dilation (built-in ResNets only).
        freeze_backbone_batch_norms: frozen batch norms and a frozen stem and first stage, as for fine-tuning a
            pretrained backbone (the paper); False trains the whole backbone with ordinary batch norms, as a
            backbone trained from scratch needs.
        num_feature_levels: L, 1 to 5. Up to 3 levels come from the backbone (strides 8/16/32); each further
            level is a stride-2 3x3 convolution on the previous one.
        encoder_n_points / decoder_n_points: K, sampling points per head and level.
        with_box_refine: iterative bounding box refinement (one box head per decoder layer).
        two_stage: encoder proposals become the decoder's queries; needs `with_box_refine`.
        class_cost / bbox_cost / giou_cost: Hungarian matcher weights;
        bbox_loss_coefficient / giou_loss_coefficient / focal_alpha: loss weights.
    """

    model_type = "hub_deformable_detr"
    # a sub-config as transformers' composite configs have them: the attention implementation and the dtype set on
    # this config reach it, and the backbone model built from it holds this very object; None (optional) means the
    # built-in ResNet named by `backbone`
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet", optional=True),
    }
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

    backbone: str = "resnet50"
    backbone_config: dict | PretrainedConfig | None = None
    dilation: bool = False
    freeze_backbone_batch_norms: bool = True
    num_channels: int = 3
    num_queries: int = 300
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 1024
    decoder_ffn_dim: int = 1024
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    num_feature_levels: int = 4
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    position_embedding_type: str = "sine"
    with_box_refine: bool = False
    two_stage: bool = False
    two_stage_num_proposals: int = 300
    auxiliary_loss: bool = True
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    bbox_loss_coefficient: float = 5.0
    giou_loss_coefficient: float = 2.0
    focal_alpha: float = 0.25
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.backbone_config, dict):
            backbone_type = self.backbone_config.get("model_type")
            if backbone_type not in CONFIG_MAPPING:
                raise ValueError(f"backbone_config has an unknown model_type {backbone_type!r}")
            self.backbone_config = CONFIG_MAPPING[backbone_type].from_dict(self.backbone_config)
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self):
        """Raises a ValueError naming the first field that cannot work."""
        counts = [name for name, kind in type(self).__annotations__.items() if kind is int]
        for name in counts:
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1 (the classes id2label names), got {self.num_labels}")
        if self.backbone_config is None and self.backbone not in RESNET_SPECS:
            raise ValueError(
                f"backbone={self.backbone!r} is not a built-in backbone; choose one of {sorted(RESNET_SPECS)} "
                "or pass a transformers backbone_config"
            )
        if self.backbone_config is not None and self.dilation:
            raise ValueError("dilation (DC5) is only available with the built-in ResNets, not with backbone_config")
        if not 1 <= self.num_feature_levels <= MAX_FEATURE_LEVELS:
            raise ValueError(
                f"num_feature_levels must be between 1 and {MAX_FEATURE_LEVELS}, got {self.num_feature_levels}"
            )
        if self.d_model < 32 or self.d_model % 32:
            raise ValueError(
                f"d_model must be a positive multiple of 32 (GroupNorm(32) in the input projections), "
                f"got {self.d_model}"
            )
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if getattr(self, heads) < 1 or self.d_model % getattr(self, heads):
                raise ValueError(f"d_model ({self.d_model}) must be divisible by {heads} ({getattr(self, heads)})")
        positive = (
            "num_channels",
            "num_queries",
            "decoder_layers",
            "encoder_n_points",
            "decoder_n_points",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "two_stage_num_proposals",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.encoder_layers < 0:
            raise ValueError(f"encoder_layers must be at least 0, got {self.encoder_layers}")
        if self.activation_function not in ACT2FN:
            raise ValueError(f"activation_function {self.activation_function!r} is not one of {sorted(ACT2FN)}")
        if self.position_embedding_type not in ("sine", "learned"):
            raise ValueError(
                f"position_embedding_type must be 'sine' or 'learned', got {self.position_embedding_type!r}"
            )
        if self.two_stage and not self.with_box_refine:
            raise ValueError("two_stage=True needs with_box_refine=True (the paper's two-stage variant refines boxes)")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(
                f"focal_alpha must be in [0, 1] (the positives' weight in the focal loss), got {self.focal_alpha}"
            )
        for name in ("class_cost", "bbox_cost", "giou_cost", "bbox_loss_coefficient", "giou_loss_coefficient"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
