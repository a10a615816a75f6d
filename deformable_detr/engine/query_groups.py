"""Training-only queries, heads and losses that leave the inference network as it is: Group DETR's extra query
groups, H-DETR's hybrid (one-to-many) queries, MS-DETR's one-to-many heads and the IoU-aware classification loss.

`TrainingQueries` holds the training-only parts (the extra query embeddings and the one-to-many heads; they are no
part of the model, so a saved model is a plain Deformable DETR), runs the model on the model's own Q queries followed
by the extra ones, keeps the sets apart with a block mask over the decoder's self-attention (a query attends only to
its own set), and computes the loss: each Group-DETR group matched one-to-one on its own, the hybrid set matched to
the ground truth repeated k times, and so are the one-to-many heads' predictions for the model's own queries
(`one_to_many_heads.py`); all in one matching. In two-stage the extra queries are the next top-scoring proposals
after the model's Q (learned ones it has not). After training the extra queries and heads are dropped: the model's
queries attend only to each other, so their outputs are those of the plain model.

`TrainingNetwork` is the model and those parts as one module, which a run prepares (data parallel, FSDP2) as a
whole, so that the training-only parts' gradients are synchronised and clipped with the model's.

Shapes: B batch, C = d_model, Q the model's queries, G groups (the model's queries count as the first), H hybrid
queries, N classes.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..model.loss_deformable_detr import DeformableDetrLoss, decoder_sets, model_sets
from .one_to_many_heads import ONE_TO_MANY_SUFFIX, OneToManyHeads
from .options import TrainingOptions

FILE = "training_queries.safetensors"  # the training-only weights (TrainingQueries'), in a checkpoint folder
DETECTOR = "detector."  # the model's entries in a TrainingNetwork's state dict
HYBRID_SUFFIX = "_hybrid"  # the hybrid set's loss terms: loss_ce_hybrid, loss_ce_0_hybrid, ...


@dataclass
class TrainingLoss:
    """The loss of one batch (a scalar) and its terms, as the model's output has them."""

    loss: torch.Tensor
    loss_dict: dict[str, torch.Tensor]


def block_mask(sizes: list[int], device=None) -> torch.Tensor:
    """(sum(sizes), sum(sizes)) bool, True where a query may attend to another: within its own block of
    consecutive queries."""
    block = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return block[:, None] == block[None, :]


class TrainingQueries(nn.Module):
    """The extra queries of a training run and the loss over all of them; see the module's docstring. Its
    submodules and parameters are the run's training-only parts, which checkpoints keep (`save`, `load`)."""

    def __init__(
        self,
        config,
        *,
        query_groups: int = 1,
        hybrid_queries: int = 0,
        hybrid_repeats: int = 6,
        hybrid_loss_weight: float = 1.0,
        classification_loss: str = "focal",
        one_to_many_heads: bool = False,
        one_to_many_repeats: int = 6,
        one_to_many_loss_weight: float = 1.0,
    ):
        """`one_to_many_heads`: MS-DETR's heads (`OneToManyHeads`), trained with each object repeated
        `one_to_many_repeats` times, their terms weighted by `one_to_many_loss_weight` in the total."""
        super().__init__()
        # the queries the model selects by itself: learned ones, or in two-stage its top-scoring proposals
        self.num_queries = config.two_stage_num_proposals if config.two_stage else config.num_queries
        self.query_groups, self.hybrid_queries = query_groups, hybrid_queries
        self.hybrid_repeats, self.hybrid_loss_weight = hybrid_repeats, hybrid_loss_weight
        extra = (query_groups - 1) * self.num_queries + hybrid_queries
        # (query position, query content), as the model's query_embed, initialised alike (normal); two-stage
        # queries come from proposals, and need none
        self.query_embed = nn.Embedding(extra, 2 * config.d_model) if extra and not config.two_stage else None
        self.criterion = DeformableDetrLoss(config, classification_loss)
        self.one_to_many = OneToManyHeads(config) if one_to_many_heads else None
        self.one_to_many_repeats, self.one_to_many_loss_weight = one_to_many_repeats, one_to_many_loss_weight

    @property
    def sizes(self) -> list[int]:
        """The sets of queries in the decoder's order: the G groups (the model's first), then the hybrid set."""
        return [self.num_queries] * self.query_groups + ([self.hybrid_queries] if self.hybrid_queries else [])

    def decoder_inputs(self, detector, batch: int, device) -> dict:
        """The model's keyword arguments for all the sets of queries (none without extra ones): query_embeds
        (Q + extra, 2C), the model's own first, or in two-stage num_proposals; and the block mask
        decoder_attention_mask (B, Q + extra, Q + extra)."""
        total = sum(self.sizes)
        if total == self.num_queries:
            return {}
        mask = block_mask(self.sizes, device)[None].expand(batch, -1, -1)
        if self.query_embed is None:  # two-stage: the top-scoring proposals, best first
            return {"decoder_attention_mask": mask, "num_proposals": total}
        query_embeds = torch.cat([detector.model.query_embed.weight, self.query_embed.weight])
        return {"decoder_attention_mask": mask, "query_embeds": query_embeds}

    def forward(self, detector, pixel_values, pixel_mask, labels) -> TrainingLoss:
        """The loss of a batch through `detector` (the model itself, whose query_embed the extra queries follow);
        pixel_values (B, 3, H, W), pixel_mask (B, H, W), labels as the model takes them."""
        outputs = detector(
            pixel_values=pixel_values,
            pixel_mask=pixel_mask,
            output_auxiliary=True,
            **self.decoder_inputs(detector, len(pixel_values), pixel_values.device),
        )
        return TrainingLoss(*self.criterion.combined(self.prediction_sets(outputs), labels))

    def prediction_sets(self, outputs) -> list:
        """The PredictionSets of the loss, from the model's `outputs`: the model's own (its G groups of queries,
        its two-stage proposals), the hybrid set's, and the one-to-many heads' for the model's own queries."""
        layers = [(outputs.logits, outputs.pred_boxes)]
        layers += [(aux["logits"], aux["pred_boxes"]) for aux in outputs.auxiliary_outputs or ()]
        logits, boxes = torch.stack([c for c, _ in layers]), torch.stack([b for _, b in layers])  # (L, B, Q', ...)
        enc_boxes = None if outputs.enc_outputs_coord_logits is None else outputs.enc_outputs_coord_logits.sigmoid()
        grouped = self.num_queries * self.query_groups
        sets = model_sets(
            logits[:, :, :grouped], boxes[:, :, :grouped], outputs.enc_outputs_class, enc_boxes, self.query_groups
        )
        if self.hybrid_queries:
            hybrid = logits[:, :, grouped:], boxes[:, :, grouped:]
            sets.append(decoder_sets(*hybrid, 1, HYBRID_SUFFIX, self.hybrid_repeats, self.hybrid_loss_weight))
        if self.one_to_many is not None:
            many = self.one_to_many(outputs, self.num_queries)
            sets.append(
                decoder_sets(*many, 1, ONE_TO_MANY_SUFFIX, self.one_to_many_repeats, self.one_to_many_loss_weight)
            )
        return sets

    def save(self, folder: str, main_process: bool = True):
        """The training-only weights into `folder` (a checkpoint), where there are any. Every process calls it:
        sharded weights (FSDP2's DTensors) are gathered whole; the main process writes them."""
        from safetensors.torch import save_file

        weights = {name: _whole(tensor.detach()).contiguous() for name, tensor in self.state_dict().items()}
        if weights and main_process:
            save_file(weights, os.path.join(folder, FILE))

    def load(self, folder: str):
        """The training-only weights that `save` wrote into checkpoint `folder` (whole, not sharded ones)."""
        from safetensors.torch import load_file

        own = self.state_dict()
        if own:
            device = next(iter(own.values())).device
            self.load_state_dict(load_file(os.path.join(folder, FILE), device=str(device)))


class TrainingNetwork(nn.Module):
    """The model (`detector`) and its training-only parts (`queries`) as one module, which accelerate or FSDP2
    prepares as a whole: every parameter's gradient is synchronised across the processes and clipped together.
    With labels its forward gives the training loss (a TrainingLoss); without, the model's own outputs
    (evaluation). Its state dict holds the model's under DETECTOR (`detector_weights`) and the training-only
    parts under "queries."."""

    def __init__(self, detector: nn.Module, queries: TrainingQueries):
        super().__init__()
        self.detector, self.queries = detector, queries

    def forward(self, pixel_values, pixel_mask=None, labels=None):
        """pixel_values (B, 3, H, W), pixel_mask (B, H, W), labels as the model takes them."""
        if labels is None:
            return self.detector(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return self.queries(self.detector, pixel_values, pixel_mask, labels)


def detector_of(module: nn.Module) -> nn.Module:
    """The model in `module`: a TrainingNetwork's detector, or `module` itself."""
    return module.detector if isinstance(module, TrainingNetwork) else module


def detector_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights`, the state dict of `module` (unwrapped), as the model's own: a TrainingNetwork's without its
    training-only parts, under the model's names; any other module's as they are."""
    if not isinstance(module, TrainingNetwork):
        return weights
    return {name.removeprefix(DETECTOR): tensor for name, tensor in weights.items() if name.startswith(DETECTOR)}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (every process takes part); a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check_resumable_queries(folder: str, queries: TrainingQueries | None):
    """ValueError where checkpoint `folder` holds other training-only weights (none, or other names or shapes)
    than this run's `queries`: the optimiser's state would not fit either."""
    path = os.path.join(folder, FILE)
    wanted = {} if queries is None else {name: tuple(t.shape) for name, t in queries.state_dict().items()}
    saved = {}
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    if saved != wanted:
        raise ValueError(
            f"{folder} was trained with {_described(saved)} ({FILE}), this run has {_described(wanted)} "
            "(query_groups, hybrid_queries, one_to_many_heads): resume it with its own options, or start afresh in "
            "another output_dir"
        )


def _described(shapes: dict[str, tuple]) -> str:
    """The training-only weights of these names and shapes, in words: their extra queries and heads."""
    queries = shapes.get("query_embed.weight", (0,))[0]
    heads = any(name.startswith("one_to_many.") for name in shapes)
    return f"{queries} extra learned queries and {'' if heads else 'no '}one-to-many heads"


def training_queries(options: TrainingOptions, config) -> TrainingQueries | None:
    """The run's training-only queries and loss, or None for the paper's recipe (the model's own loss)."""
    plain = options.query_groups == 1 and not options.hybrid_queries and not options.one_to_many_heads
    if plain and options.classification_loss == "focal":
        return None
    queries = TrainingQueries(
        config,
        query_groups=options.query_groups,
        hybrid_queries=options.hybrid_queries,
        hybrid_repeats=options.hybrid_repeats,
        hybrid_loss_weight=options.hybrid_loss_weight,
        one_to_many_heads=options.one_to_many_heads,
        one_to_many_repeats=options.one_to_many_repeats,
        one_to_many_loss_weight=options.one_to_many_loss_weight,
        classification_loss=options.classification_loss,
    )
    if queries.query_embed is not None:
        nn.init.normal_(queries.query_embed.weight)
    return queries
