"""A fixed batch for the tests of the training-only queries and heads: two images and their labels."""

import torch

LABELS = [
    {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
]


def images() -> torch.Tensor:
    """(2, 3, 64, 80) pixel values, the same every call."""
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 80)
