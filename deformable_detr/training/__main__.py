"""`python -m deformable_detr.training` (and `accelerate launch -m deformable_detr.training`): the training command."""

from ..cli import train_main

train_main()
