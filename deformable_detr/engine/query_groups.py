"""Training-only queries and losses that leave the inference network as it is: Group DETR's extra query groups,
H-DETR's hybrid (one-to-many) queries and the IoU-aware classification loss.

`TrainingQueries` owns the extra query embeddings (they are no part of the model, so a saved model is a plain
Deformable DETR), runs the model on the model's own Q queries followed by the extra ones, keeps the sets apart with
a block mask over the decoder's self-attention (a query attends only to its own set), and computes the loss: each
Group-DETR group matched one-to-one on its own (together with the model's queries, in one matching), the hybrid
set matched to the ground truth repeated k times. After training the extra queries are dropped: the model's queries
attend only to each other, so their outputs are those of the plain model.

Shapes: B batch, C = d_model, Q the model's queries, G groups (the model's queries count as the first), H hybrid
queries, N classes.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..model.loss_deformable_detr import DeformableDetrLoss
from .options import TrainingOptions

FILE = "training_queries.safetensors"  # the extra query embeddings, in a checkpoint folder
HYBRID_SUFFIX = "_hybrid"  # the hybrid set's loss terms: loss_ce_hybrid, loss_ce_0_hybrid, ...


@dataclass
class TrainingLoss:
    """The loss of one batch (a scalar) and its terms, as the model's output has them."""

    loss: torch.Tensor
    loss_dict: dict[str, torch.Tensor]


def one_to_many_targets(targets: list[dict], repeats: int) -> list[dict]:
    """Each image's objects repeated `repeats` times, (T,) labels and (T, 4) boxes -> (repeats * T,) and
    (repeats * T, 4): the one-to-many targets, each object matched to as many queries."""
    return [
        {**t, "class_labels": t["class_labels"].repeat(repeats), "boxes": t["boxes"].repeat(repeats, 1)}
        for t in targets
    ]


def block_mask(sizes: list[int], device=None) -> torch.Tensor:
    """(sum(sizes), sum(sizes)) bool, True where a query may attend to another: within its own block of
    consecutive queries."""
    block = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return block[:, None] == block[None, :]


class TrainingQueries(nn.Module):
    """The extra queries of a training run and the loss over all of them; see the module's docstring."""

    def __init__(
        self,
        config,
        *,
        query_groups: int = 1,
        hybrid_queries: int = 0,
        hybrid_repeats: int = 6,
        hybrid_loss_weight: float = 1.0,
        classification_loss: str = "focal",
    ):
        super().__init__()
        if config.two_stage and (query_groups > 1 or hybrid_queries):
            raise ValueError(
                "query_groups and hybrid_queries add learned queries, which a two-stage model (config.two_stage) "
                "has not: its queries are the top-scoring proposals"
            )
        self.num_queries, self.query_groups, self.hybrid_queries = config.num_queries, query_groups, hybrid_queries
        self.hybrid_repeats, self.hybrid_loss_weight = hybrid_repeats, hybrid_loss_weight
        extra = (query_groups - 1) * config.num_queries + hybrid_queries
        # (query position, query content), as the model's query_embed, initialised alike (normal)
        self.query_embed = nn.Embedding(extra, 2 * config.d_model) if extra else None
        self.criterion = DeformableDetrLoss(config, classification_loss)

    @property
    def sizes(self) -> list[int]:
        """The sets of queries in the decoder's order: the G groups (the model's first), then the hybrid set."""
        return [self.num_queries] * self.query_groups + ([self.hybrid_queries] if self.hybrid_queries else [])

    def forward(self, model, bare_model, pixel_values, pixel_mask, labels) -> TrainingLoss:
        """The loss of a batch: `model` as it trains (prepared), `bare_model` the model itself (whose query_embed
        the extra queries follow); pixel_values (B, 3, H, W), pixel_mask (B, H, W), labels as the model takes them."""
        query_embeds = mask = None
        if self.query_embed is not None:
            query_embeds = torch.cat([bare_model.model.query_embed.weight, self.query_embed.weight])
            mask = block_mask(self.sizes, pixel_values.device)[None].expand(len(pixel_values), -1, -1)
        outputs = model(
            pixel_values=pixel_values,
            pixel_mask=pixel_mask,
            decoder_attention_mask=mask,
            query_embeds=query_embeds,
            output_auxiliary=True,
        )
        layers = [(outputs.logits, outputs.pred_boxes)]
        layers += [(aux["logits"], aux["pred_boxes"]) for aux in outputs.auxiliary_outputs or ()]
        enc_boxes = None if outputs.enc_outputs_coord_logits is None else outputs.enc_outputs_coord_logits.sigmoid()
        grouped = self.num_queries * self.query_groups
        loss, terms = self._loss(layers, 0, grouped, labels, outputs.enc_outputs_class, enc_boxes, self.query_groups)
        if self.hybrid_queries:
            many = one_to_many_targets(labels, self.hybrid_repeats)
            hybrid_loss, hybrid_terms = self._loss(layers, grouped, None, many)
            loss = loss + self.hybrid_loss_weight * hybrid_loss
            terms.update((name + HYBRID_SUFFIX, value) for name, value in hybrid_terms.items())
        return TrainingLoss(loss, terms)

    def _loss(self, layers, start, end, targets, enc_logits=None, enc_boxes=None, query_groups=1):
        """The criterion over the queries [start, end) of every layer's (logits (B, Q', N), boxes (B, Q', 4))."""
        (logits, boxes), earlier = layers[0], layers[1:]
        auxiliary = [{"logits": c[:, start:end], "pred_boxes": b[:, start:end]} for c, b in earlier]
        return self.criterion(
            logits[:, start:end], boxes[:, start:end], targets, auxiliary, enc_logits, enc_boxes, query_groups
        )

    def save(self, folder: str):
        """The extra query embeddings into `folder` (a checkpoint), where there are any."""
        from safetensors.torch import save_file

        if self.query_embed is not None:
            save_file({"query_embed.weight": self.query_embed.weight.detach().contiguous()}, os.path.join(folder, FILE))

    def load(self, folder: str):
        """The extra query embeddings that `save` wrote into checkpoint `folder`."""
        from safetensors.torch import load_file

        if self.query_embed is not None:
            saved = load_file(os.path.join(folder, FILE), device=str(self.query_embed.weight.device))
            with torch.no_grad():
                self.query_embed.weight.copy_(saved["query_embed.weight"])


def check_resumable_queries(folder: str, queries: TrainingQueries | None):
    """ValueError where checkpoint `folder` holds other extra queries (none, or another number) than this run's
    `queries`: the optimiser's state would not fit either."""
    path = os.path.join(folder, FILE)
    wanted = None if queries is None or queries.query_embed is None else tuple(queries.query_embed.weight.shape)
    saved = None
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            saved = tuple(f.get_slice("query_embed.weight").get_shape())
    if saved != wanted:
        had = f"{saved[0]} extra queries" if saved else "no extra queries"
        has = f"{wanted[0]}" if wanted else "none"
        raise ValueError(
            f"{folder} was trained with {had} ({FILE}), this run has {has} (query_groups, hybrid_queries): "
            "resume it with its own options, or start afresh in another output_dir"
        )


def training_queries(options: TrainingOptions, config) -> TrainingQueries | None:
    """The run's training-only queries and loss, or None for the paper's recipe (the model's own loss)."""
    if options.query_groups == 1 and not options.hybrid_queries and options.classification_loss == "focal":
        return None
    queries = TrainingQueries(
        config,
        query_groups=options.query_groups,
        hybrid_queries=options.hybrid_queries,
        hybrid_repeats=options.hybrid_repeats,
        hybrid_loss_weight=options.hybrid_loss_weight,
        classification_loss=options.classification_loss,
    )
    if queries.query_embed is not None:
        nn.init.normal_(queries.query_embed.weight)
    return queries
