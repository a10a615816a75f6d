"""MS-DETR's one-to-many heads (Zhao et al., 2024): during training only, class and box heads of their own read the
decoder's outputs of the model's own queries at every layer, and are trained one-to-many (each object repeated k
times, matched to the queries through these heads' predictions) beside the model's one-to-one heads. The queries'
hidden states learn from both; the heads are no part of the model, so what is saved is a plain Deformable DETR.

Shapes: B batch, L decoder layers, Q the model's queries, C = d_model, N classes.
"""

import torch
from torch import nn

from ..model.deformable_transformer import MLP, HeadLinear, refine_boxes
from ..model.modeling_deformable_detr import _class_bias, _init_box_head

ONE_TO_MANY_SUFFIX = "_one_to_many"  # the heads' loss terms: loss_ce_one_to_many, loss_ce_0_one_to_many, ...


class OneToManyHeads(nn.Module):
    """A class head and a box head per decoder layer, or one pair for all layers where the model shares its own
    (without box refinement); initialised as the paper initialises the model's."""

    def __init__(self, config):
        super().__init__()
        C, heads = config.d_model, config.decoder_layers if config.with_box_refine else 1
        self.all_layers = config.auxiliary_loss  # every layer's predictions, as the model's loss has them
        self.class_embed = nn.ModuleList(HeadLinear(C, config.num_labels) for _ in range(heads))
        self.bbox_embed = nn.ModuleList(MLP(C, C, 4, 3) for _ in range(heads))
        with torch.no_grad():
            for linear in self.modules():
                if isinstance(linear, nn.Linear):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.zeros_(linear.bias)
            for index, (class_head, box_head) in enumerate(zip(self.class_embed, self.bbox_embed)):
                class_head.bias.copy_(_class_bias(class_head))
                # sizes start at sigmoid(-2) where the model's first (or shared) box head's do
                _init_box_head(box_head, -2.0 if index == 0 and not config.two_stage else 0.0)

    def forward(self, outputs, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' predictions for the first `queries` queries (the model's own) of `outputs` (a
        DeformableDetrForObjectDetection's), each layer's from its hidden states and, as the model's heads do, the
        reference it received -> logits (L', B, Q, N) and boxes (L', B, Q, 4): the last layer first, then layers
        0 .. L - 2 (L' = L), or the last alone without config.auxiliary_loss."""
        hidden_states = outputs.intermediate_hidden_states[:, :, :queries]
        references = [outputs.init_reference_points] + list(outputs.intermediate_reference_points[:, :-1].unbind(1))
        layers = list(range(hidden_states.shape[1]))
        layers = layers[-1:] + (layers[:-1] if self.all_layers else [])
        logits, boxes = [], []
        for layer in layers:
            head = layer if len(self.class_embed) > 1 else 0
            logits.append(self.class_embed[head](hidden_states[:, layer]))
            delta = self.bbox_embed[head](hidden_states[:, layer])
            boxes.append(refine_boxes(references[layer][:, :queries], delta))
        return torch.stack(logits), torch.stack(boxes)
