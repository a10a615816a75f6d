"""The model and optimiser groups of a run: a preset, config file or saved model with the data's classes, and the
paper's three learning rates."""

import os

from torch import nn

from ..model.configuration_deformable_detr import DeformableDetrConfig
from ..model.modeling_deformable_detr import DeformableDetrForObjectDetection
from ..model.ms_deform_attn import MultiScaleDeformableAttention
from ..weights.backbone_weights import load_backbone_weights
from .options import CONFIG_PRESETS, DEFAULT_MODEL, OverrideValue, option_text

HUB_TIMEOUT = 5  # seconds the one request asking whether the Hub answers may take
# below this many training images a fresh model (random transformer and heads) rarely learns to detect
FEW_IMAGES = 3000


def check_hub_model(source: str):
    """Raises ConnectionError, in one line that names --config_name, where `source` is a Hub id (no folder here)
    whose config is not in the local cache and the Hub cannot be asked: offline mode (HF_HUB_OFFLINE), or no
    answer to one quick request, instead of half a minute of huggingface_hub's retries."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, get_session, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return  # no Hub id: load_model names the missing folder
    if os.path.exists(source) or isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    if constants.is_offline_mode():
        why = "offline mode (HF_HUB_OFFLINE) is on"
    else:
        try:
            get_session().get(f"{constants.ENDPOINT}/api/models/{source}", timeout=HUB_TIMEOUT)
            return
        except Exception as error:  # noqa: BLE001 -- DNS, refused, timeout, proxy: the Hub does not answer
            why = f"the Hub ({constants.ENDPOINT}) cannot be reached ({type(error).__name__})"
    raise ConnectionError(
        f"model_name_or_path {source}: {why}, and the model is not in the local cache; connect to download it once, "
        "give a saved model folder, or train a fresh model with --config_name tiny (or paper)"
    )


def warn_of_a_fresh_model(options, images: int, logger):
    """A fresh model on few images: said at the start, since its mAP will stay low."""
    if options.config_name and images < FEW_IMAGES:
        logger.warning(
            "a fresh model (--config_name %s) starts from random weights: on %d training images its mAP will most "
            "likely stay low (near 0 on real photos: DETR-style models need tens of thousands of images, or long "
            "training, to learn from scratch). Fine-tune a trained model instead: leave out --config_name to start "
            "from %s (COCO), or give --model_name_or_path",
            options.config_name,
            images,
            DEFAULT_MODEL,
        )


def build_config(name: str, overrides: dict[str, OverrideValue] | None = None) -> DeformableDetrConfig:
    """A fresh model's config: a preset's (CONFIG_PRESETS) or a config file's or folder's, then `overrides`, each
    value converted to its attribute's type as transformers' `update_from_string` converts; ValueError naming a bad
    one."""
    if name in CONFIG_PRESETS:
        config = DeformableDetrConfig(**CONFIG_PRESETS[name])
    elif os.path.isfile(name) or os.path.isdir(name):
        config = DeformableDetrConfig.from_pretrained(name)
    else:
        raise ValueError(
            f"config_name {name!r} is neither a config file/folder nor a preset ({', '.join(CONFIG_PRESETS)})"
        )
    if overrides:
        try:
            for key, value in overrides.items():
                config.update_from_string(f"{key}={option_text(value)}")
        except (ValueError, TypeError) as error:
            raise ValueError(f"config_overrides {option_text(overrides)!r}: {error}") from error
        config.validate()
    return config


def build_model(options, class_names: list[str]) -> DeformableDetrForObjectDetection:
    """The run's model: the saved one of model_name_or_path (ours or transformers'), or a fresh one of config_name
    (with backbone_weights, if given), with class heads for `class_names`."""
    if options.model_name_or_path:
        from ..weights.loading import load_model

        model = load_model(options.model_name_or_path)
    else:
        config = build_config(options.config_name, options.config_overrides)
        overridden = options.config_overrides or {}
        if not options.backbone_weights and "freeze_backbone_batch_norms" not in overridden:
            config.freeze_backbone_batch_norms = False  # a random backbone must learn, batch norms included
        config.id2label = dict(enumerate(class_names))
        config.label2id = {name: i for i, name in enumerate(class_names)}
        model = DeformableDetrForObjectDetection(config)
        if options.backbone_weights:
            load_backbone_weights(model, options.backbone_weights)
    model.set_labels(class_names)
    return model


def sampling_modules(model: DeformableDetrForObjectDetection) -> list[nn.Module]:
    """The modules that say where deformable attention samples, trained at sampling_lr_factor x the lr: every
    attention's sampling offsets, and the queries' reference points (a two-stage model takes them from the
    encoder's proposals instead)."""
    modules = [m.sampling_offsets for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    if not model.config.two_stage:
        modules.append(model.model.reference_points)
    return modules


def parameter_groups(model: DeformableDetrForObjectDetection, options) -> list[dict]:
    """The paper's three learning rates: the backbone's, the sampling modules' (`sampling_modules`), everything
    else's; each group's trainable parameters in the model's order."""
    backbone = {id(p) for p in model.model.backbone.parameters()}
    sampling = {id(p) for module in sampling_modules(model) for p in module.parameters()}
    groups = {"backbone": [], "sampling": [], "rest": []}
    for parameter in model.parameters():
        if parameter.requires_grad:
            name = "backbone" if id(parameter) in backbone else "sampling" if id(parameter) in sampling else "rest"
            groups[name].append(parameter)
    lrs = {
        "backbone": options.backbone_learning_rate,
        "sampling": options.learning_rate * options.sampling_lr_factor,
        "rest": options.learning_rate,
    }
    return [{"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params]
