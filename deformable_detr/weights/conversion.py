"""Checkpoints from elsewhere -> ours: transformers' DeformableDetrForObjectDetection (v4 and v5 layouts, through
the weight-conversion mapping of transformers_mapping.py, which from_pretrained applies too) and the original
fundamentalvision/Deformable-DETR `.pth` files (their own renames, then that mapping's head placement). Every key is
mapped explicitly; a key left over is an error, so that nothing is silently dropped."""

import os
import re

import torch

from ..model.configuration_deformable_detr import DeformableDetrConfig
from ..model.transformers_mapping import (
    TRANSFORMERS_MODEL_TYPE,
    from_pretrained_kwargs,
    is_transformers_config,
    key_mapping,
)
from ..utils.messages import listed
from .checks import refuse_unfit_weights, stored_config
from .state_dicts import read_checkpoint, state_dict_of

ORIGINAL_RENAMES = [
    (r"^backbone\.0\.body\.", "model.backbone.body."),
    (r"^backbone\.1\.row_embed\.", "model.position_embedding.row_embed."),
    (r"^backbone\.1\.col_embed\.", "model.position_embedding.col_embed."),
    (r"^input_proj\.", "model.input_proj."),
    (r"^query_embed\.", "model.query_embed."),
    (
        r"^transformer\.(level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\b",
        r"model.\1",
    ),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.self_attn_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.ffn_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"model.decoder.layers.\1.cross_attn_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"model.decoder.layers.\1.self_attn_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.ffn_norm."),
    (r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.linear([12])\.", r"model.\1.layers.\2.ffn.linear\3."),
    (r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|cross_attn)\.", r"model.\1.layers.\2.\3."),
    # the heads as transformers names them: then transformers_mapping.key_mapping places both
    (r"^transformer\.decoder\.(class|bbox)_embed\.", r"model.decoder.\1_embed."),
]


def _rename(key: str, renames) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _renamed(state: dict, renames: dict[str, str], source: str) -> dict:
    """`state` with its keys renamed as transformers renames them for `from_pretrained(key_mapping=renames)`; keys
    that become one (a head's copies) must hold the same values."""
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    transforms = [WeightRenaming(theirs, ours) for theirs, ours in renames.items()]
    out, origin = {}, {}
    for key, value in state.items():
        target = apply_renamings(key, transforms)
        if target in out and not _same(out[target], value):
            raise ValueError(f"{source}: {origin[target]} and {key} both give our {target}, but they differ")
        out[target], origin[target] = value, key
    return out


def _load_converted(config, state, source):
    from ..model.modeling_deformable_detr import DeformableDetrForObjectDetection

    model = DeformableDetrForObjectDetection(config)
    expected = model.state_dict()
    unknown = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    if unknown or missing:
        raise ValueError(
            f"{source}: keys left unmapped [{listed(unknown, 10, sort=True, quote=True)}]; "
            f"our keys not found [{listed(missing, 10, sort=True, quote=True)}]"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, ours {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def from_transformers(source):
    """transformers' DeformableDetrForObjectDetection (in memory, or a saved folder / Hub id of one, v4 or v5 layout)
    -> ours, loaded by our from_pretrained through transformers' weight-conversion mapping (transformers_mapping.py),
    but strictly: a key of either side left unmatched, or a shape that differs, is a ValueError naming them, where
    from_pretrained would warn and leave ours random. FileNotFoundError for a folder that is not here, ValueError for
    another model (ours included) or transformers' bare DeformableDetrModel, which has no heads."""
    from ..model.modeling_deformable_detr import DeformableDetrForObjectDetection

    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        hf_config, weights = stored_config(name), {"pretrained_model_name_or_path": name}
        if not is_transformers_config(hf_config):
            raise ValueError(
                f"{name}/config.json has model_type {hf_config.get('model_type')!r}, expected "
                f"{TRANSFORMERS_MODEL_TYPE!r}"
            )
    else:
        name = type(source).__name__
        model_type = getattr(getattr(source, "config", None), "model_type", None)
        if model_type != TRANSFORMERS_MODEL_TYPE:
            raise ValueError(
                f"from_transformers takes transformers' DeformableDetrForObjectDetection, got a {name} (model_type "
                f"{model_type!r})"
            )
        hf_config, weights = (
            source.config.to_dict(),
            {"pretrained_model_name_or_path": None, "state_dict": source.state_dict()},
        )
    model, loading = DeformableDetrForObjectDetection.from_pretrained(
        **weights, **from_pretrained_kwargs(hf_config, {}), output_loading_info=True, ignore_mismatched_sizes=True
    )
    model._weight_conversions = None  # a save writes what one of a model built here would (see from_pretrained)
    heads = {key for key in model.state_dict() if key.startswith("class_embed")}
    if heads <= set(loading["missing_keys"]):
        raise ValueError(
            f"{name} has no class heads (class_embed): from_transformers takes transformers' "
            "DeformableDetrForObjectDetection, not its bare DeformableDetrModel"
        )
    refuse_unfit_weights(name, loading)
    return model.eval()


def config_from_original_args(args, num_labels: int, **overrides) -> DeformableDetrConfig:
    """The original training script's argparse namespace -> our config."""
    fields = {}
    if args is not None:
        a = vars(args)
        names = {
            "backbone": "backbone",
            "dilation": "dilation",
            "num_queries": "num_queries",
            "hidden_dim": "d_model",
            "nheads": "encoder_attention_heads",
            "enc_layers": "encoder_layers",
            "dec_layers": "decoder_layers",
            "dim_feedforward": "encoder_ffn_dim",
            "num_feature_levels": "num_feature_levels",
            "enc_n_points": "encoder_n_points",
            "dec_n_points": "decoder_n_points",
            "with_box_refine": "with_box_refine",
            "two_stage": "two_stage",
            "dropout": "dropout",
            "position_embedding": "position_embedding_type",
        }
        fields = {ours: a[theirs] for theirs, ours in names.items() if theirs in a}
        if "nheads" in a:
            fields["decoder_attention_heads"] = a["nheads"]
        if "dim_feedforward" in a:
            fields["decoder_ffn_dim"] = a["dim_feedforward"]
        if fields.get("position_embedding_type") == "v2":
            fields["position_embedding_type"] = "sine"
        if fields.get("two_stage"):
            fields["two_stage_num_proposals"] = fields.get("num_queries", 300)
    fields["num_labels"] = num_labels
    fields.update(overrides)
    return DeformableDetrConfig(**fields)


def from_original_checkpoint(path, **config_overrides):
    """A fundamentalvision/Deformable-DETR checkpoint (`{"model": state_dict, "args": Namespace}`) -> ours.

    The architecture comes from the stored `args` when present; `config_overrides` win over them.
    """
    checkpoint = read_checkpoint(path)
    state = state_dict_of(checkpoint)
    if not isinstance(state, dict) or "query_embed.weight" not in state and "transformer.level_embed" not in state:
        raise ValueError(
            f"{path} does not look like an original Deformable-DETR checkpoint (no transformer.level_embed)"
        )
    num_labels = state["class_embed.0.weight"].shape[0]
    config = config_from_original_args(checkpoint.get("args"), num_labels, **config_overrides)
    renamed = {_rename(k, ORIGINAL_RENAMES): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return _load_converted(config, _renamed(renamed, key_mapping(config), str(path)), str(path))
