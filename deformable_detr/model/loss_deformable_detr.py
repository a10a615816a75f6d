"""The training loss: Hungarian matching of queries to objects, then sigmoid focal loss on the classes and
L1 + GIoU on the boxes, for the last decoder layer, every earlier layer (auxiliary) and, in two-stage, the
encoder proposals (class-agnostic).

Shapes: B batch, Q queries, N classes, T objects in one image. Boxes are (cx, cy, w, h) in [0, 1].
"""

import importlib
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, paired_box_iou, paired_generalized_box_iou


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise focal loss (Lin et al.): logits and 0/1 targets of the same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def iou_aware_bce_loss(logits, onehot, iou, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise IoU-aware binary cross-entropy (RF-DETR's ia_bce_loss, after DEIM): where `onehot` is 1 (a
    matched query's class) the target is t = max(p^alpha * IoU^(1 - alpha), 0.01), detached, with p the sigmoid of
    the logit and IoU (broadcast against the logits) that of the query's box with its object's, and the loss
    -t log p - (1 - t) log(1 - p); everywhere else a focal negative without alpha, -p^gamma log(1 - p), whose
    weight p^gamma is differentiated too (as RF-DETR's is).
    logits, onehot, iou: the same shape (or broadcastable)."""
    prob = logits.sigmoid()
    positive = onehot.bool()
    t = (prob.detach() ** alpha * iou.detach().clamp(min=0) ** (1 - alpha)).clamp(min=0.01)
    positive_weight = torch.where(positive, t, 0.0)
    negative_weight = torch.where(positive, 1 - t, prob**gamma)  # a focal weight, differentiated as the focal's
    # -log(1 - p) = logit - logsigmoid(logit), stable for large logits
    return negative_weight * logits - F.logsigmoid(logits) * (positive_weight + negative_weight)


@dataclass
class PredictionSets:
    """P prediction sets that the loss matches to the batch's objects, each set on its own: logits (P, B, Q, N) and
    boxes (P, B, Q, 4) as (cx, cy, w, h). `names`: the suffixes of the P sets' terms. `repeats`: every object
    repeated k times (one-to-many: up to k queries of a set match each object). `foreground`: class-agnostic, every
    object of class 0 (the two-stage proposals). `weight`: the factor of the sets' terms in the total loss."""

    names: list[str]
    logits: torch.Tensor
    boxes: torch.Tensor
    repeats: int = 1
    foreground: bool = False
    weight: float = 1.0


def decoder_sets(logits, boxes, query_groups: int = 1, suffix: str = "", repeats: int = 1, weight: float = 1.0):
    """Every decoder layer's predictions as PredictionSets: logits (L, B, G * Q, N), boxes (L, B, G * Q, 4), the
    last layer first, then layers 0 .. L - 2 (named "", then "_0", "_1", ...), their queries split into G groups of
    Q (Group DETR; the first unnamed, then "_group1", ...), each matched one-to-one on its own; `suffix` follows
    those names, and each group's terms count `weight` / G in the total."""
    layers = [""] + [f"_{i}" for i in range(len(logits) - 1)]
    names = [layer + (f"_group{g}" if g else "") + suffix for layer in layers for g in range(query_groups)]
    split = _split_groups(logits, query_groups), _split_groups(boxes, query_groups)
    return PredictionSets(names, *split, repeats=repeats, weight=weight / query_groups)


def model_sets(logits, boxes, enc_logits=None, enc_boxes=None, query_groups: int = 1) -> list[PredictionSets]:
    """The model's own PredictionSets: its decoder layers' (`decoder_sets`: logits (L, B, G * Q, N), boxes
    (L, B, G * Q, 4), the last layer first, in G groups) and, in two-stage, its proposals' (enc_logits (B, S, N),
    enc_boxes (B, S, 4)), matched class-agnostically, named "_enc")."""
    sets = [decoder_sets(logits, boxes, query_groups)]
    if enc_logits is not None:
        sets.append(PredictionSets(["_enc"], enc_logits[None], enc_boxes[None], foreground=True))
    return sets


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to objects minimising class_cost * focal class cost +
    bbox_cost * L1 + giou_cost * (-GIoU), per image (scipy's linear_sum_assignment)."""

    def __init__(self, class_cost=1.0, bbox_cost=5.0, giou_cost=2.0, alpha=0.25, gamma=2.0):
        super().__init__()
        self.class_cost, self.bbox_cost, self.giou_cost, self.alpha, self.gamma = (
            class_cost,
            bbox_cost,
            giou_cost,
            alpha,
            gamma,
        )

    @torch.no_grad()
    def forward(self, logits, pred_boxes, targets):
        """logits (B, Q, N), pred_boxes (B, Q, 4), targets: per image {"class_labels" (T,), "boxes" (T, 4)}
        -> per image (query indices, object indices), each (min(Q, T),) int64."""
        matches = self.match([PredictionSets([""], logits[None], pred_boxes[None])], targets)[0]
        _, images, queries, objects = matches.cpu()
        starts = np.cumsum([0] + [len(t["boxes"]) for t in targets])
        return [(queries[images == i], objects[images == i] - start) for i, start in enumerate(starts[:-1])]

    @torch.no_grad()
    def match(self, sets: list[PredictionSets], targets) -> list[torch.Tensor]:
        """Per PredictionSets of `sets`, its matches as a (4, M) int64 index on its device: per match its set, image,
        query and object (an index into the batch's objects, concatenated; a repeated object's is the object's).
        Each image's queries are costed against its own objects only, in one cost computation per PredictionSets
        (against each object once, however many times it repeats); all the costs come to the CPU in one copy,
        and all the matches back in one."""
        device = sets[0].logits.device
        sizes = [len(t["boxes"]) for t in targets]
        pad = nn.utils.rnn.pad_sequence
        labels = pad([t["class_labels"].long() for t in targets], batch_first=True)  # (B, T)
        # padded with the box (0.5, 0.5, 0.5, 0.5): finite costs, never read
        boxes = pad([t["boxes"].float() for t in targets], batch_first=True, padding_value=0.5)  # (B, T, 4)
        shapes = [(*s.logits.shape[:3], labels.shape[1]) for s in sets]
        costs = torch.empty(sum(math.prod(shape) for shape in shapes), device=device)
        start = 0
        for s, shape in zip(sets, shapes):  # written in place, so that one set's temporaries are alive at a time
            set_labels = torch.zeros_like(labels) if s.foreground else labels
            costs[start : start + math.prod(shape)].view(shape).copy_(self.cost(s.logits, s.boxes, set_labels, boxes))
            start += math.prod(shape)
        matches = _assign(costs, shapes, sizes, [s.repeats for s in sets])
        counts = [m.shape[1] for m in matches]
        return list(torch.from_numpy(np.concatenate(matches, 1)).to(device, non_blocking=True).split(counts, 1))

    def cost(self, logits, pred_boxes, labels, boxes) -> torch.Tensor:
        """logits (P, B, Q, N), pred_boxes (P, B, Q, 4), each image's objects' labels (B, T) and boxes (B, T, 4)
        -> (P, B, Q, T) float32, each query's cost against each object of its image (finite)."""
        P, B, Q = logits.shape[:3]
        prob = logits.float().sigmoid()
        pred_boxes = pred_boxes.float()
        negative = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        class_cost = (positive - negative).gather(-1, labels[None, :, None].expand(P, B, Q, -1))
        bbox_cost = torch.cdist(pred_boxes, boxes[None], p=1)
        giou = paired_generalized_box_iou(
            box_cxcywh_to_xyxy(pred_boxes)[..., None, :], box_cxcywh_to_xyxy(boxes)[None, :, None]
        )
        cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * -giou
        # a non-finite cost (a diverging prediction) must not break the assignment
        big = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)


@torch.compiler.disable  # scipy on the CPU: left out of torch.compile's graphs on purpose, not by a failed trace
def _assign(costs: torch.Tensor, shapes: list[tuple], sizes: list[int], repeats: list[int]) -> list[np.ndarray]:
    """costs: the (P, B, Q, T) costs of every PredictionSets, flattened one after another; sizes: each image's
    objects (T = the most of them); repeats: each PredictionSets' k -> per PredictionSets the (4, M) int64 matches
    of `HungarianMatcher.match`: per set and image, the cheapest assignment of the image's objects, each repeated
    k times, to the queries."""
    host = costs.cpu().numpy()  # the one copy to the host
    offsets = np.cumsum([0] + [math.prod(shape) for shape in shapes])
    keys, problems = [], []
    for index, (shape, k) in enumerate(zip(shapes, repeats)):
        set_costs = host[offsets[index] : offsets[index + 1]].reshape(shape)
        for p in range(shape[0]):
            for b, n in enumerate(sizes):
                keys.append((index, p, b))
                problems.append(np.tile(set_costs[p, b, :, :n], (1, k)))  # a repeated object's costs are its own
    starts = np.cumsum([0, *sizes])
    found = [[] for _ in shapes]
    for (index, p, b), (queries, objects) in zip(keys, _solve(problems)):
        image_objects = objects % max(sizes[b], 1) + starts[b]  # a repeat's index is its object's
        found[index].append(np.stack([np.full_like(queries, p), np.full_like(queries, b), queries, image_objects]))
    return [np.concatenate(matches, 1) for matches in found]


def _solve(problems: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each (Q, T) cost matrix's cheapest assignment (scipy's linear_sum_assignment: (rows, columns)), on as many
    threads as torch uses (scipy lets go of the GIL while it solves; a step with many queries and objects spends
    most of its matching time there)."""
    # by name: transformers' remote-code check scans the files for import statements, and people who only run
    # inference from the Hub must not need scipy
    linear_sum_assignment = importlib.import_module("scipy.optimize").linear_sum_assignment
    workers = min(len(problems), torch.get_num_threads())
    if workers < 2:
        return [linear_sum_assignment(problem) for problem in problems]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(linear_sum_assignment, problems))


def _object_total(targets, device) -> tuple[float, int]:
    """The batch's objects summed over the processes, and the processes, so that every process divides alike."""
    count = float(sum(len(t["class_labels"]) for t in targets))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count, 1
    total = torch.tensor([count], device=device)
    torch.distributed.all_reduce(total)
    return total.item(), torch.distributed.get_world_size()


def _split_groups(sets: torch.Tensor, groups: int) -> torch.Tensor:
    """(P, B, G * Q, ...) -> (P * G, B, Q, ...): each set's G groups of queries as sets of their own."""
    if groups == 1:
        return sets
    P, B, GQ = sets.shape[:3]
    if GQ % groups:
        raise ValueError(f"{GQ} queries do not split into {groups} groups (query_groups) of the same size")
    grouped = sets.reshape(P, B, groups, GQ // groups, *sets.shape[3:])
    return grouped.transpose(1, 2).flatten(0, 1)


# The terms of one prediction set, under these names for the last decoder layer; the earlier layers' carry the
# suffix `_{i}` (decoder layer i), the two-stage proposals' `_enc`.
CORNERS_TOLERANCE = 0.01  # how far a (cx, cy, w, h) box may run past its image before it counts as running past

MAIN_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


class DeformableDetrLoss(nn.Module):
    """loss_ce (focal), loss_bbox (L1), loss_giou and cardinality_error (logged only, no weight), per prediction
    set (see MAIN_TERMS)."""

    def __init__(self, config, classification_loss: str = "focal"):
        """`classification_loss`: "focal" (the paper's) or "iou_aware" (`iou_aware_bce_loss`), a training choice
        that is no part of the model's config."""
        super().__init__()
        if classification_loss not in ("focal", "iou_aware"):
            raise ValueError(f"classification_loss must be 'focal' or 'iou_aware', got {classification_loss!r}")
        self.classification_loss = classification_loss
        self.matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost, config.focal_alpha)
        self.focal_alpha = config.focal_alpha
        # the weight in the total loss of each term of MAIN_TERMS but cardinality_error (logged only)
        self.weights = {
            "loss_ce": 1.0,
            "loss_bbox": config.bbox_loss_coefficient,
            "loss_giou": config.giou_loss_coefficient,
        }

    def stacked(self, sets: PredictionSets, matches, targets, num_boxes: float):
        """The loss terms of P prediction sets, computed together, from their (4, M) `matches`
        (`HungarianMatcher.match`) -> {name in MAIN_TERMS: (P,)}. The focal, L1 and GIoU terms are sums divided by
        num_boxes (the sets' objects, repeated, averaged over processes); cardinality_error is logged, not trained
        on."""
        logits, pred_boxes = sets.logits, sets.boxes
        P, B, Q = logits.shape[:3]
        set_index, images, queries, objects = matches
        labels = torch.cat([t["class_labels"] for t in targets]).long()
        if sets.foreground:
            labels = torch.zeros_like(labels)
        boxes = torch.cat([t["boxes"] for t in targets])
        onehot = torch.zeros_like(logits)
        onehot[set_index, images, queries, labels[objects]] = 1.0
        predicted = pred_boxes[set_index, images, queries]
        wanted = boxes[objects].to(predicted.dtype)
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(wanted))
        if self.classification_loss == "focal":
            loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha)
        else:
            iou = torch.zeros(P, B, Q, 1, dtype=logits.dtype, device=logits.device)
            iou[set_index, images, queries, 0] = paired_box_iou(
                box_cxcywh_to_xyxy(predicted.detach()), box_cxcywh_to_xyxy(wanted)
            ).to(iou.dtype)
            loss_ce = iou_aware_bce_loss(logits, onehot, iou, self.focal_alpha)
        loss_ce = loss_ce.flatten(1).sum(1) / num_boxes

        def per_set(matched):  # (M,) one value per match -> (P,) their sums in fp32 (each query matches once)
            dense = torch.zeros(P, B, Q, dtype=torch.float32, device=matched.device)
            return dense.index_put((set_index, images, queries), matched.float()).flatten(1).sum(1)

        loss_bbox = per_set((predicted - wanted).abs().sum(-1)) / num_boxes
        loss_giou = per_set(1 - giou) / num_boxes
        with torch.no_grad():
            predicted_count = (logits.sigmoid().max(-1).values > 0.5).sum(-1).float()  # (P, B)
            true_count = torch.tensor([float(sets.repeats * len(t["class_labels"])) for t in targets])
            true_count = true_count.to(logits.device, non_blocking=True)
            cardinality = (predicted_count - true_count).abs().mean(-1)
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou, "cardinality_error": cardinality}

    def forward(self, logits, pred_boxes, targets, auxiliary_outputs=(), enc_logits=None, enc_boxes=None):
        """
        Args:
            logits (B, Q, N), pred_boxes (B, Q, 4): the last decoder layer.
            targets: per image {"class_labels" (T,) int64, "boxes" (T, 4)}.
            auxiliary_outputs: the earlier layers, each {"logits", "pred_boxes"}.
            enc_logits (B, S, N), enc_boxes (B, S, 4): two-stage proposals, matched class-agnostically.
        Returns:
            the weighted total loss (scalar) and every term in a dict (`combined`).
        """
        auxiliary_outputs = list(auxiliary_outputs or ())
        layer_logits = torch.stack([logits] + [aux["logits"] for aux in auxiliary_outputs])
        layer_boxes = torch.stack([pred_boxes] + [aux["pred_boxes"] for aux in auxiliary_outputs])
        return self.combined(model_sets(layer_logits, layer_boxes, enc_logits, enc_boxes), targets)

    def combined(self, sets: list[PredictionSets], targets):
        """The loss of every prediction set of `sets` (the model's decoder layers, query groups, the proposals and
        any training-only ones), each matched on its own, all in one matching (`HungarianMatcher.match`): the total
        (scalar) sums each PredictionSets' weighted terms times its weight; the terms, under the names of MAIN_TERMS
        followed by each set's name, come in the order of `sets`."""
        first = sets[0].logits
        self.check_targets(targets, first.shape[-1], first.shape[1])
        objects, processes = _object_total(targets, first.device)
        total, terms = 0, {}
        for prediction_sets, matches in zip(sets, self.matcher.match(sets, targets)):
            num_boxes = max(prediction_sets.repeats * objects / processes, 1.0)
            stacked = self.stacked(prediction_sets, matches, targets, num_boxes)
            weighted = sum(stacked[name].sum() * weight for name, weight in self.weights.items())
            total = total + weighted * prediction_sets.weight
            for index, suffix in enumerate(prediction_sets.names):  # each set's terms, as scalars of their own
                terms.update((name + suffix, values[index].clone()) for name, values in stacked.items())
        return total, terms

    @staticmethod
    def check_targets(targets, num_labels: int, batch: int):
        """ValueError naming labels[i] unless the targets are one dict per image with (T,) integer class ids in
        [0, num_labels) and (T, 4) boxes (cx, cy, w, h), finite and normalised to [0, 1]; the values are checked
        together, with one device sync."""
        if not isinstance(targets, (list, tuple)) or len(targets) != batch:
            got = f"{len(targets)} of them" if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(f"labels must be a list of {batch} dicts, one per image of the batch, got {got}")
        for i, target in enumerate(targets):
            if not isinstance(target, Mapping):
                raise ValueError(f"labels[{i}] must be a dict, got {type(target).__name__}")
            labels, boxes = target.get("class_labels"), target.get("boxes")
            if labels is None or boxes is None:
                raise ValueError(f"labels[{i}] needs 'class_labels' and 'boxes', got keys {sorted(target)}")
            if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
                raise ValueError(f"labels[{i}]['class_labels'] must be a (T,) tensor of integer class ids")
            if (
                not isinstance(boxes, torch.Tensor)
                or boxes.ndim != 2
                or boxes.shape[-1] != 4
                or len(boxes) != len(labels)
            ):
                raise ValueError(
                    f"labels[{i}]: boxes must be a ({len(labels)}, 4) tensor, got {getattr(boxes, 'shape', boxes)}"
                )
        ids = torch.cat([t["class_labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        bad_ids = (ids < 0) | (ids >= num_labels)
        bad_boxes = ~(torch.isfinite(boxes) & (boxes >= 0) & (boxes <= 1)).all(-1)
        # corners (x0, y0, x1, y1) read as (cx, cy, w, h) mostly run past the image: most boxes doing so, and
        # fitting as corners, are corners
        centres, sides = boxes[:, :2], boxes[:, 2:] / 2
        past = ((centres - sides < -CORNERS_TOLERANCE) | (centres + sides > 1 + CORNERS_TOLERANCE)).any(-1)
        as_corners = (past & (boxes[:, 2:] >= boxes[:, :2]).all(-1)).sum() * 2 > len(boxes)
        if not (bad_ids.any() | bad_boxes.any() | as_corners):
            return
        sizes = [len(t["class_labels"]) for t in targets]
        per_image = zip(ids.split(sizes), bad_ids.split(sizes), boxes.split(sizes), bad_boxes.split(sizes))
        for i, (image_ids, image_bad_ids, image_boxes, image_bad_boxes) in enumerate(per_image):  # which, where
            if image_bad_ids.any():
                raise ValueError(
                    f"labels[{i}] has class id {image_ids[image_bad_ids][0].item()}, "
                    f"outside the model's {num_labels} classes (config.num_labels)"
                )
            box = image_boxes[image_bad_boxes]
            if len(box):
                raise ValueError(
                    f"labels[{i}] has the box {box[0].tolist()}: boxes are (cx, cy, w, h) normalised to [0, 1] of "
                    "the image (the image processor makes them from pixel boxes)"
                )
        raise ValueError(
            f"{int(past.sum())} of the labels' {len(boxes)} boxes run past their image as (cx, cy, w, h) but fit it as "
            f"corners (x0, y0, x1, y1), e.g. {boxes[past][0].tolist()}: boxes are (cx, cy, w, h) normalised to "
            "[0, 1] (box_ops.box_xyxy_to_cxcywh converts corners; the image processor makes them from pixel boxes)"
        )
