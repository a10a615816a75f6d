"""An exponential moving average of the weights (`--ema_decay`), as RF-DETR and detrex keep one: after each
optimiser step, average = d * average + (1 - d) * weights with d = decay * (1 - exp(-updates / warmup_steps)),
so that the first steps, far from where training goes, weigh little. Evaluation and the saved model use the
average; it is saved with every checkpoint (`ema.safetensors`, or in the shard files of sharded training), so a
resumed run continues it exactly."""

import math
import os
import warnings
from contextlib import contextmanager

import torch

FILE = "ema.safetensors"


class WeightAverage:
    """The average of `model`'s floating-point parameters and buffers (others, such as batch-norm counters, are
    copied); `updates` counts the steps averaged."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup_steps: int):
        self.decay, self.warmup_steps, self.updates = decay, warmup_steps, 0
        self.average = _copy(model)

    def factor(self) -> float:
        """d of the next update."""
        return self.decay * (1 - math.exp(-(self.updates + 1) / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        d = self.factor()
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                self.average[name].mul_(d).add_(tensor.detach(), alpha=1 - d)
            else:
                self.average[name].copy_(tensor)
        self.updates += 1

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Within the block, `model` holds the average; its own weights come back after."""
        own = _copy(model)
        model.load_state_dict(self.average)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def save(self, folder: str):
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous() for name, tensor in self.average.items()}, os.path.join(folder, FILE))

    def load(self, folder: str, updates: int, model: torch.nn.Module):
        """The average saved in checkpoint `folder`; where it holds none (a run without --ema_decay), the average
        starts again from `model`'s resumed weights, with a warning."""
        from safetensors.torch import load_file

        if not os.path.isfile(os.path.join(folder, FILE)):
            warnings.warn(
                f"{folder} holds no weight average ({FILE}): it starts from the resumed weights", stacklevel=2
            )
            self.__init__(model, self.decay, self.warmup_steps)
            return
        saved = load_file(os.path.join(folder, FILE))
        if set(saved) != set(self.average):
            raise ValueError(f"{os.path.join(folder, FILE)} does not hold this model's weights")
        for name, tensor in saved.items():
            self.average[name].copy_(tensor)
        self.updates = updates


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
