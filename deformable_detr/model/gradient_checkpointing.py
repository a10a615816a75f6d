"""Activation checkpointing of the backbone stages and the encoder and decoder layers."""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layer(owner: nn.Module, layer, x):
    """layer(x); with `owner.gradient_checkpointing` while training with gradients, its activations are not kept
    but recomputed in the backward pass (random state preserved: the same gradients), trading time for memory.

    The checkpoint function is the one transformers' `activation_checkpointing_enable` sets
    (`owner._gradient_checkpointing_func`, with its `activation_checkpointing_kwargs`). A stage after the frozen
    stem gets an input that needs no gradient; the reentrant checkpoint would then give its parameters none, so
    that input is made to ask for one. A frozen stage on such an input builds no graph: nothing to checkpoint."""
    if owner.gradient_checkpointing and owner.training and torch.is_grad_enabled():
        if not x.requires_grad:
            if not any(p.requires_grad for p in layer.parameters()):
                return layer(x)
            x = x.detach().requires_grad_()
        return getattr(owner, "_gradient_checkpointing_func", partial(checkpoint, use_reentrant=False))(layer, x)
    return layer(x)


def set_gradient_checkpointing(model, enable: bool = True, use_reentrant: bool = False):
    """Activation checkpointing of the backbone stages and the encoder and decoder layers, through transformers'
    switch (`activation_checkpointing_enable` / `_disable`); `model` is one of our PreTrainedModels."""
    if enable:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.activation_checkpointing_disable()
