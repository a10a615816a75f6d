"""Activation checkpointing (--gradient_checkpointing, backbone.set_gradient_checkpointing): the same loss and
gradients, dropout included, with the backbone stages and the encoder and decoder layers recomputed."""

import pytest
import torch

from deformable_detr.model.gradient_checkpointing import set_gradient_checkpointing
from tests.support.models import tiny_model


def loss_and_gradients(model, pixel_values, labels):
    model.zero_grad()
    torch.manual_seed(3)  # the dropout masks
    loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_gradients():
    model = tiny_model(with_box_refine=True, freeze_backbone_batch_norms=False, dropout=0.1).train()
    pixel_values = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    labels = [
        {"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.6]])},
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # batch-norm statistics move in each pass
    plain_loss, plain = loss_and_gradients(model, pixel_values, labels)
    model.load_state_dict(state)
    set_gradient_checkpointing(model)
    flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    # the ResNet body (its stages) and each encoder and decoder layer
    assert len(flags) == 1 + model.config.encoder_layers + model.config.decoder_layers
    checkpointed_loss, checkpointed = loss_and_gradients(model, pixel_values, labels)
    assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-6, rtol=0)
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.filterwarnings("error::UserWarning")  # such as the checkpoint's "None of the inputs have requires_grad"
def test_reentrant_and_non_reentrant_checkpoints_give_the_plain_gradients(use_reentrant):
    """transformers' switch with its activation_checkpointing_kwargs: both checkpoint kinds, dropout on, the stem
    and first stage frozen (with the reentrant kind, the stages after a frozen input get their gradient too)."""
    model = tiny_model(dropout=0.1, encoder_layers=2).train()
    pixel_values = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]])}] * 2
    plain_loss, plain = loss_and_gradients(model, pixel_values, labels)
    assert any(name.startswith("model.backbone.body.layer2.") for name in plain)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    for module in (model.model.backbone.body, model.model.encoder.layers[1], model.model.decoder.layers[0]):
        assert module.gradient_checkpointing and module._gradient_checkpointing_func.keywords == {
            "use_reentrant": use_reentrant
        }
    checkpointed_loss, checkpointed = loss_and_gradients(model, pixel_values, labels)
    assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-6, rtol=0)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=0), name
    model.activation_checkpointing_disable()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
