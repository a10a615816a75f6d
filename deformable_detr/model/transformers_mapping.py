"""transformers' own Deformable DETR checkpoints (model_type "deformable_detr", v4 and v5 layouts) -> ours, through
transformers' weight-conversion mechanism: the renames and the decoder's q/k/v -> in_proj fusion every config shares
are registered for our model_type (transformers applies them in `from_pretrained` and reverses them in
`save_pretrained`), the renames that depend on the config (the heads, learned positions, the query embedding) are a
`key_mapping` that `from_pretrained` passes for such a checkpoint, and its config.json becomes ours.

Part of the Hub set (the modeling file imports it): torch, transformers and its siblings only.
"""

from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, WeightConverter, WeightRenaming

from .configuration_deformable_detr import RESNET_SPECS, DeformableDetrConfig

# the model_type in the config.json of transformers' own Deformable DETR; ours is DeformableDetrConfig.model_type
TRANSFORMERS_MODEL_TYPE = "deformable_detr"


def is_transformers_config(config: dict) -> bool:
    """Whether `config` (the fields of a config.json) is transformers' own Deformable DETR's, to be converted."""
    return config.get("model_type") == TRANSFORMERS_MODEL_TYPE


# (transformers' pattern, ours), for every config. A part only one layout has is written `(?:part|)`: transformers
# drops such groups when it reverses a pattern to save, so v4 (`conv_encoder`, `fc1`, `out_proj`) and v5 (`mlp.fc1`,
# `o_proj`) names both load, and the shorter one is what a save writes. Unanchored, so that the bare model's keys
# (no `model.` prefix) match too.
RENAMES = (
    (r"backbone\.(?:conv_encoder\.|)model\.(?:_backbone\.|)", "backbone.body."),
    ("self_attn_layer_norm", "self_attn_norm"),
    ("encoder_attn_layer_norm", "cross_attn_norm"),
    ("final_layer_norm", "ffn_norm"),
    ("encoder_attn", "cross_attn"),
    (r"(?:mlp\.|)fc1", "ffn.linear1"),
    (r"(?:mlp\.|)fc2", "ffn.linear2"),
    (r"self_attn\.o(?:ut|)_proj", "self_attn.out_proj"),  # the decoder's; the encoder's is output_proj in both
)

# the decoder's self-attention: transformers' separate projections, packed in that order into ours
IN_PROJ_PARTS = ("q_proj", "k_proj", "v_proj")

# transformers config fields that ours shares by name
SHARED_CONFIG_FIELDS = (
    "num_channels",
    "num_queries",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "encoder_n_points",
    "decoder_n_points",
    "num_feature_levels",
    "activation_function",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "position_embedding_type",
    "with_box_refine",
    "two_stage",
    "two_stage_num_proposals",
    "auxiliary_loss",
    "class_cost",
    "bbox_cost",
    "giou_cost",
    "bbox_loss_coefficient",
    "giou_loss_coefficient",
    "focal_alpha",
    "id2label",
    "label2id",
    "dilation",
)


def conversions() -> list:
    """transformers' WeightRenaming / WeightConverter list for every config: transformers' names -> ours."""
    fused = [
        WeightConverter(
            [f"self_attn.{part}.{kind}" for part in IN_PROJ_PARTS],
            f"self_attn.in_proj_{kind}",
            operations=[Concatenate(dim=0)],
        )
        for kind in ("weight", "bias")
    ]
    return [WeightRenaming(theirs, ours) for theirs, ours in RENAMES] + fused


def key_mapping(config: DeformableDetrConfig) -> dict[str, str]:
    """The renames of transformers' keys that depend on the config, as `from_pretrained(key_mapping=...)` takes them
    (applied before `conversions()`): the per-layer heads `class_embed.{i}` / `bbox_embed.{i}` (and their copies
    under `model.decoder.`) onto ours, the learned position embedding and the query embedding."""
    copies = r"^(?:model\.decoder\.|)"
    mapping = {}
    if config.position_embedding_type == "learned":
        for theirs, ours in (("row_embeddings", "row_embed"), ("column_embeddings", "col_embed")):
            mapping[rf"(?:backbone\.|)position_embedding\.{theirs}"] = f"position_embedding.{ours}"
    if not config.two_stage:
        mapping["query_position_embeddings"] = "query_embed"
    if not config.with_box_refine:  # every layer's copy of the one shared head
        return mapping | {rf"{copies}{kind}_embed\.\d+\.": f"{kind}_embed." for kind in ("class", "bbox")}
    if config.two_stage:  # the heads after the last layer's score the encoder's proposals
        layers = config.decoder_layers
        mapping |= {rf"{copies}{kind}_embed\.{layers}\.": f"model.enc_{kind}_embed." for kind in ("class", "bbox")}
    return mapping | {
        rf"{copies}class_embed\.(\d+)\.": r"class_embed.\1.",
        rf"{copies}bbox_embed\.(\d+)\.": r"model.decoder.bbox_embed.\1.",
    }


def config_from_transformers(hf_config: dict, **overrides) -> DeformableDetrConfig:
    """A transformers DeformableDetrConfig (as a dict, v4 or v5 style) -> ours; `overrides` (fields of ours) win,
    and a `num_labels` among them without `id2label` drops the stored label names."""
    fields = {k: hf_config[k] for k in SHARED_CONFIG_FIELDS if k in hf_config and hf_config[k] is not None}
    if "num_labels" in overrides and "id2label" not in overrides:
        fields.pop("id2label", None)
        fields.pop("label2id", None)
    backbone_config = hf_config.get("backbone_config")
    if backbone_config and backbone_config.get("model_type") == "timm_backbone":
        fields["backbone"] = backbone_config.get("backbone") or backbone_config.get("architecture")
        fields["dilation"] = bool(fields.get("dilation")) or backbone_config.get("output_stride") == 16
    elif backbone_config:
        fields["backbone_config"] = backbone_config
        fields.pop("dilation", None)
    else:  # v4: use_timm_backbone with a timm model name
        fields["backbone"] = hf_config.get("backbone") or "resnet50"
    if fields.get("backbone") is not None and fields["backbone"] not in RESNET_SPECS:
        raise ValueError(
            f"transformers checkpoint uses backbone {fields['backbone']!r}; built-in ones are {sorted(RESNET_SPECS)}"
        )
    return DeformableDetrConfig(**(fields | overrides))


def from_pretrained_kwargs(hf_config: dict, kwargs: dict) -> dict:
    """`from_pretrained`'s kwargs for a transformers checkpoint whose config.json is `hf_config`: `config`, ours made
    from it with the kwargs that name a field of ours (e.g. `num_labels`, `id2label`) applied, as transformers
    applies them to a stored config; and `key_mapping`, ours for that config before any the caller gave."""
    names = set(DeformableDetrConfig.__annotations__) | {"num_labels", "id2label", "label2id"}
    kwargs = dict(kwargs)
    config = config_from_transformers(hf_config, **{name: kwargs.pop(name) for name in names & set(kwargs)})
    return kwargs | {"config": config, "key_mapping": key_mapping(config) | (kwargs.get("key_mapping") or {})}


# transformers skips the mappings of models defined outside it unless they are registered by hand; a second import
# (remote code beside the package) registers the same list again
register_checkpoint_conversion_mapping(DeformableDetrConfig.model_type, conversions(), overwrite=True)
