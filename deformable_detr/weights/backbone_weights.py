"""ImageNet (or other) weights with torchvision's names for the built-in ResNet backbone."""

from ..model.backbone import ResNet
from ..utils.messages import listed
from .state_dicts import read_state_dict

BACKBONE_PREFIXES = (
    "module.",
    "model.backbone.conv_encoder.model.",
    "model.backbone.body.",
    "backbone.0.body.",
    "_backbone.",
)


def load_backbone_weights(model, source: str):
    """Pretrained weights into the built-in ResNet of `model` (a DeformableDetrModel or the detector around one): a
    local file (.safetensors, .pth, .bin with torchvision names, e.g. torchvision's or timm's ResNet-50) or a Hub id;
    only this ever downloads. The classifier (fc.*) is ignored, any other key left over or missing is an error."""
    body = getattr(model, "model", model).backbone.body
    if not isinstance(body, ResNet):
        raise ValueError(
            "load_backbone_weights is for the built-in ResNets; give a transformers backbone its weights "
            "with its own from_pretrained and copy them into model.backbone.body"
        )
    state = {}
    for key, value in read_state_dict(source).items():
        for prefix in BACKBONE_PREFIXES:
            key = key[len(prefix) :] if key.startswith(prefix) else key
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            state[key] = value
    expected = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {source!r} do not fit this ResNet: missing [{listed(missing, 5, sort=True, quote=True)}]"
            f", unexpected [{listed(unexpected, 5, sort=True, quote=True)}]"
        )
    wrong = [k for k in state if state[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(
            f"backbone weights {source!r}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
            f"this ResNet wants {tuple(expected[wrong[0]].shape)} (another depth?)"
        )
    body.load_state_dict(state, strict=False)  # strict but for num_batches_tracked, checked above
