"""Checkpoints from elsewhere -> ours: transformers' DeformableDetrForObjectDetection (v4 and v5 layouts) and the
original fundamentalvision/Deformable-DETR `.pth` files. Every key is mapped explicitly; a key left over is
an error, so that nothing is silently dropped."""

import difflib
import json
import os
import re

import torch

from .configuration_deformable_detr import RESNET_SPECS, DeformableDetrConfig

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

# (pattern, replacement) applied in order to transformers' names once the backbone prefix is settled
TRANSFORMERS_RENAMES = [
    (r"^model\.query_position_embeddings\.", "model.query_embed."),
    (r"^model\.(?:backbone\.)?position_embedding\.row_embeddings\.", "model.position_embedding.row_embed."),
    (r"^model\.(?:backbone\.)?position_embedding\.column_embeddings\.", "model.position_embedding.col_embed."),
    (r"\.self_attn_layer_norm\.", ".self_attn_norm."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_norm."),
    (r"\.final_layer_norm\.", ".ffn_norm."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.(?:mlp\.)?fc1\.", ".ffn.linear1."),
    (r"\.(?:mlp\.)?fc2\.", ".ffn.linear2."),
    (r"(decoder\.layers\.\d+\.self_attn)\.(?:o_proj|out_proj)\.", r"\1.out_proj."),
]

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
]


def _rename(key: str, renames) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _place_heads(state: dict, config: DeformableDetrConfig, source: str) -> dict:
    """Per-layer heads `class_embed.{i}`, `bbox_embed.{i}` (+ copies inside the decoder) -> our head layout."""
    layers = config.decoder_layers
    out = {
        k: v
        for k, v in state.items()
        if not re.match(r"^(model\.decoder\.|transformer\.decoder\.)?(class|bbox)_embed\.", k)
    }
    heads = {k: v for k, v in state.items() if k not in out}
    per_layer = {}  # (kind, index, rest) -> tensor, copies must agree
    for key, value in heads.items():
        kind, index, rest = re.match(
            r"^(?:model\.decoder\.|transformer\.decoder\.)?(class|bbox)_embed\.(\d+)\.(.+)$", key
        ).groups()
        slot = (kind, int(index), rest)
        if slot in per_layer and not _same(per_layer[slot], value):
            raise ValueError(f"{source}: {key} differs from another copy of the same head")
        per_layer[slot] = value
    for (kind, index, rest), value in per_layer.items():
        if config.two_stage and index == layers:
            target = f"model.enc_{kind}_embed.{rest}"
        elif index >= layers:
            raise ValueError(f"{source}: head {kind}_embed.{index} is beyond the {layers} decoder layers")
        elif config.with_box_refine:
            target = f"class_embed.{index}.{rest}" if kind == "class" else f"model.decoder.bbox_embed.{index}.{rest}"
        else:
            first = per_layer.get((kind, 0, rest))
            if first is None or not _same(first, value):
                raise ValueError(
                    f"{source}: without box refinement every decoder layer must share {kind}_embed.0, "
                    f"but {kind}_embed.{index} differs"
                )
            target = f"{kind}_embed.{rest}"
        out[target] = value
    return out


def _split_in_proj(state: dict) -> dict:
    """Decoder self-attention: separate q/k/v projections -> nn.MultiheadAttention's packed in_proj."""
    out = dict(state)
    for key in [k for k in state if re.search(r"decoder\.layers\.\d+\.self_attn\.q_proj\.", k)]:
        prefix, kind = re.match(r"^(.*\.self_attn)\.q_proj\.(weight|bias)$", key).groups()
        parts = [out.pop(f"{prefix}.{p}_proj.{kind}") for p in ("q", "k", "v")]
        out[f"{prefix}.in_proj_{kind}"] = torch.cat(parts, 0)
    return out


def _some(keys) -> str:
    """The first ten of `keys`, sorted, for a message: "['a', 'b'] ..." when there are more."""
    keys = sorted(keys)
    return f"{keys[:10]}{' ...' if len(keys) > 10 else ''}"


def _load_converted(config, state, source):
    from .modeling_deformable_detr import DeformableDetrForObjectDetection

    model = DeformableDetrForObjectDetection(config)
    expected = model.state_dict()
    unknown = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    if unknown or missing:
        raise ValueError(f"{source}: keys left unmapped {_some(unknown)}; our keys not found {_some(missing)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, ours {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def config_from_transformers(hf_config: dict) -> DeformableDetrConfig:
    """A transformers DeformableDetrConfig (as a dict, v4 or v5 style) -> ours."""
    fields = {k: hf_config[k] for k in SHARED_CONFIG_FIELDS if k in hf_config and hf_config[k] is not None}
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
    return DeformableDetrConfig(**fields)


def state_dict_from_transformers(state: dict, config: DeformableDetrConfig) -> dict:
    """transformers' keys (v4: `model.backbone.conv_encoder.model.`, v5: `model.backbone.model.`) -> ours."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"^model\.backbone\.(?:conv_encoder\.)?model\.", "model.backbone.body.", key)
        if config.backbone_config is not None:
            key = re.sub(r"^model\.backbone\.body\._backbone\.", "model.backbone.body.", key)
        out[_rename(key, TRANSFORMERS_RENAMES)] = value
    return _split_in_proj(_place_heads(out, config, "transformers checkpoint"))


def _read_folder(path: str):
    """config dict and state dict of a saved transformers model (folder or Hub id)."""
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["config.json", "*.safetensors", "*.bin"])
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "deformable_detr":
        raise ValueError(f"{path}/config.json has model_type {config.get('model_type')!r}, expected 'deformable_detr'")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state = {}
    if files:
        from safetensors.torch import load_file

        for name in files:
            state.update(load_file(os.path.join(path, name)))
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    return config, state


def from_transformers(source):
    """transformers' DeformableDetrForObjectDetection (in memory, or a saved folder / Hub id of one) -> ours.
    FileNotFoundError for a folder that is not here, ValueError for another model (ours included) or transformers'
    bare DeformableDetrModel, which has no heads."""
    if isinstance(source, (str, os.PathLike)):
        not_here = _mistyped_local_path(str(source))
        if not_here:
            raise FileNotFoundError(not_here)
        hf_config, state = _read_folder(str(source))
        name = str(source)
    else:
        name = type(source).__name__
        model_type = getattr(getattr(source, "config", None), "model_type", None)
        if model_type != "deformable_detr":
            raise ValueError(
                f"from_transformers takes transformers' DeformableDetrForObjectDetection, got a {name} (model_type "
                f"{model_type!r})"
            )
        hf_config, state = source.config.to_dict(), source.state_dict()
    if not any(re.match(r"^(model\.decoder\.)?class_embed\.", key) for key in state):
        raise ValueError(
            f"{name} has no class heads (class_embed): from_transformers takes transformers' "
            "DeformableDetrForObjectDetection, not its bare DeformableDetrModel"
        )
    config = config_from_transformers(hf_config)
    return _load_converted(config, state_dict_from_transformers(state, config), name)


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
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "query_embed.weight" not in state and "transformer.level_embed" not in state:
        raise ValueError(
            f"{path} does not look like an original Deformable-DETR checkpoint (no transformer.level_embed)"
        )
    num_labels = state["class_embed.0.weight"].shape[0]
    config = config_from_original_args(checkpoint.get("args"), num_labels, **config_overrides)
    renamed = {_rename(k, ORIGINAL_RENAMES): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return _load_converted(config, _place_heads(renamed, config, str(path)), str(path))


def load_model(source: str):
    """A saved model folder or Hub id, ours or transformers' Deformable DETR (converted) -> our detector.

    Raises FileNotFoundError when `source` is neither a folder here nor a model on the Hub (or the folder has no
    config.json), and ValueError naming the file or the parameters when the weights cannot be read, do not fit the
    config (transformers would leave those at random) or hold NaN or infinity."""
    from safetensors import SafetensorError
    from transformers import PretrainedConfig

    from .modeling_deformable_detr import DeformableDetrForObjectDetection

    not_here = _mistyped_local_path(source)
    if not_here:
        raise FileNotFoundError(not_here)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(
            f"{os.path.join(source, 'config.json')}: no such file (a saved model is config.json beside its weights)"
        )
    try:
        model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    except OSError as error:
        if os.path.exists(source):
            raise
        summary = str(error).strip().splitlines()[0]
        raise FileNotFoundError(f"model {source}: no such folder here, and no model on the Hub ({summary})") from None
    if model_type not in ("deformable_detr", DeformableDetrConfig.model_type):
        raise ValueError(f"{source} holds a {model_type!r} model, not a Deformable DETR")
    try:
        if model_type == "deformable_detr":  # transformers' own checkpoint
            model = DeformableDetrForObjectDetection.from_transformers(source)
        else:
            model, loading = DeformableDetrForObjectDetection.from_pretrained(
                source, output_loading_info=True, ignore_mismatched_sizes=True
            )
            _refuse_unfit_weights(source, loading)
    except SafetensorError as error:
        weights = os.path.join(source, "model.safetensors") if os.path.isdir(source) else source
        raise ValueError(f"{weights} cannot be read: {error}") from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: the weights {name} hold NaN or infinity; the model cannot detect anything")
    return model


def _refuse_unfit_weights(source: str, loading: dict):
    """ValueError naming the weights that do not fit the config, in from_pretrained's loading info: transformers
    would leave the missing and mismatched ones at random, with a warning, and detect nothing useful."""
    unfit = [
        f"{kind} keys {_some(loading[kind + '_keys'])}" for kind in ("missing", "unexpected") if loading[kind + "_keys"]
    ]
    unfit += [
        f"{key} is {tuple(stored)} in the weights but {tuple(wanted)} by the config"
        for key, stored, wanted in sorted(loading["mismatched_keys"])[:10]
    ]
    if unfit:
        raise ValueError(f"{source}: the weights do not fit its config.json: {'; '.join(unfit)}")


def _mistyped_local_path(source: str) -> str | None:
    """Why `source` is a local folder that is not here, rather than a Hub id: it is no valid Hub id, or its parent
    folder is here (runs/mdoel beside runs/model); None when it may be a Hub id. Asking the Hub first would take
    a minute of retries offline."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(source):
        return None
    parent = os.path.dirname(os.path.normpath(source))
    local_parent = bool(parent) and os.path.isdir(parent)
    try:
        validate_repo_id(source)
        if not local_parent:
            return None
    except HFValidationError:
        pass
    message = f"model {source}: no such folder"
    near = (
        difflib.get_close_matches(os.path.basename(os.path.normpath(source)), os.listdir(parent), 3)
        if local_parent
        else []
    )
    return message + (f"; did you mean {' or '.join(os.path.join(parent, name) for name in near)}?" if near else "")
