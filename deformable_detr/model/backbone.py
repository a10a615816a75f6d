"""The convolutional backbone: a built-in ResNet with torchvision's parameter names, or any transformers
backbone, with frozen batch norm; it returns up to three feature maps (strides 8, 16, 32) and their masks."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone

from .configuration_deformable_detr import RESNET_SPECS
from .gradient_checkpointing import run_layer

# Parameters kept frozen, as in the paper, when batch norms are frozen: the stem and the first stage of a ResNet.
# The built-in ResNets, and the transformers backbones known to be ResNets (by model_type); other backbones
# train whole.
RESNET_FROZEN_PREFIXES = ("conv1.", "bn1.", "layer1.")
TRANSFORMERS_FROZEN_PREFIXES = {
    "resnet": ("embedder.", "encoder.stages.0."),
    "rt_detr_resnet": ("embedder.", "encoder.stages.0."),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, so optimisers never see them)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])  # one pass over x


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replaces every nn.BatchNorm2d below `module` by a FrozenBatchNorm2d holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            if child.weight.device.type != "meta":
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def _conv_bn(in_channels, out_channels, kernel_size, stride=1, dilation=1, norm=FrozenBatchNorm2d):
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=False)
    return conv, norm(out_channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None, norm=FrozenBatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, channels, 3, stride, dilation, norm)
        self.conv2, self.bn2 = _conv_bn(channels, channels, 3, 1, dilation, norm)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)).add_(identity), inplace=True)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits in the 3x3 convolution, as in torchvision and timm."""

    expansion = 4

    def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None, norm=FrozenBatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, channels, 1, norm=norm)
        self.conv2, self.bn2 = _conv_bn(channels, channels, 3, stride, dilation, norm)
        self.conv3, self.bn3 = _conv_bn(channels, channels * 4, 1, norm=norm)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)).add_(identity), inplace=True)


class ResNet(nn.Module):
    """ResNet body without the classifier; names match torchvision (conv1, bn1, layer1.0.conv1, ...).

    forward: (B, 3, H, W) -> [layer1, layer2, layer3, layer4] outputs at strides 4, 8, 16, 32 (16 for layer4
    with dilation, i.e. DC5). `norm` is FrozenBatchNorm2d for fine-tuning, nn.BatchNorm2d to train from scratch.
    """

    def __init__(self, name: str, num_channels: int = 3, dilation: bool = False, norm=FrozenBatchNorm2d):
        super().__init__()
        block_type, depths = RESNET_SPECS[name]
        block = Bottleneck if block_type == "bottleneck" else BasicBlock
        self.conv1, self.bn1 = _conv_bn(num_channels, 64, 7, stride=2, norm=norm)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels, rate = 64, 1
        self.channels, self.strides = [], []
        stride_so_far = 4
        for index, depth in enumerate(depths):
            channels = 64 * 2**index
            stride = 1 if index == 0 else 2
            if dilation and index == 3:
                rate, stride = 2, 1
            downsample = None
            if stride != 1 or in_channels != channels * block.expansion:
                downsample = nn.Sequential(*_conv_bn(in_channels, channels * block.expansion, 1, stride, norm=norm))
            blocks = [block(in_channels, channels, stride, 1, downsample, norm)]  # torchvision: first block undilated
            in_channels = channels * block.expansion
            blocks += [block(in_channels, channels, 1, rate, norm=norm) for _ in range(depth - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            stride_so_far *= stride
            self.channels.append(in_channels)
            self.strides.append(stride_so_far)

    gradient_checkpointing = False  # set by set_gradient_checkpointing

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        outputs = []
        for index in range(1, 5):
            x = run_layer(self, getattr(self, f"layer{index}"), x)
            outputs.append(x)
        return outputs


class Backbone(nn.Module):
    """Feature maps for the transformer.

    forward(pixel_values (B, C, H, W), pixel_mask (B, H, W) bool, True on real pixels)
        -> list of (feature map (B, C_l, H_l, W_l), mask (B, H_l, W_l) bool), finest first.
    """

    def __init__(self, config):
        super().__init__()
        frozen = config.freeze_backbone_batch_norms
        if config.backbone_config is None:
            norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
            self.body = ResNet(config.backbone, config.num_channels, config.dilation, norm)
            # the last min(L, 3) of layer2..layer4, as in the paper (L = 1 takes layer4 alone)
            self.out_indices = [1, 2, 3][-min(config.num_feature_levels, 3) :]
            self.channels = [self.body.channels[i] for i in self.out_indices]
            self.strides = [self.body.strides[i] for i in self.out_indices]
            self.frozen_prefixes = RESNET_FROZEN_PREFIXES
        else:
            self.body = AutoBackbone.from_config(config.backbone_config)
            if frozen:
                self.body = freeze_batch_norm(self.body)
            self.out_indices = None
            self.channels = list(self.body.channels)
            self.strides = [None] * len(self.channels)  # not every transformers backbone states them
            if len(self.channels) > config.num_feature_levels:
                raise ValueError(
                    f"the backbone gives {len(self.channels)} feature maps but num_feature_levels is "
                    f"{config.num_feature_levels}; ask the backbone_config for fewer out_features"
                )
            self.frozen_prefixes = TRANSFORMERS_FROZEN_PREFIXES.get(config.backbone_config.model_type, ())
        if not frozen:  # trained from scratch: every layer learns
            self.frozen_prefixes = ()
        self.freeze()

    def freeze(self):
        """The stem and first stage (`frozen_prefixes`) stop training. Loading weights makes new parameters, which
        train, so `from_pretrained` calls this again."""
        for name, parameter in self.body.named_parameters():
            if name.startswith(self.frozen_prefixes):
                parameter.requires_grad_(False)

    def forward(self, pixel_values, pixel_mask):
        features = self.body(pixel_values)
        if self.out_indices is not None:
            features = [features[i] for i in self.out_indices]
        else:
            features = list(features.feature_maps)
        return [(f, downsample_mask(pixel_mask, f.shape[-2:])) for f in features]


def downsample_mask(mask, size):
    """(B, H, W) bool -> (B, h, w) bool, nearest neighbour."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
