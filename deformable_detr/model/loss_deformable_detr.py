"""The training loss: Hungarian matching of queries to objects, then sigmoid focal loss on the classes and
L1 + GIoU on the boxes, for the last decoder layer, every earlier layer (auxiliary) and, in two-stage, the
encoder proposals (class-agnostic).

Shapes: B batch, Q queries, N classes, T objects in one image. Boxes are (cx, cy, w, h) in [0, 1].
"""

import importlib
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou, paired_box_iou, paired_generalized_box_iou


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
        _, images, queries, objects = self.match(logits[None], pred_boxes[None], targets).cpu()
        starts = np.cumsum([0] + [len(t["boxes"]) for t in targets])
        return [(queries[images == i], objects[images == i] - start) for i, start in enumerate(starts[:-1])]

    @torch.no_grad()
    def match(self, logits, pred_boxes, targets) -> torch.Tensor:
        """P prediction sets matched to the same targets: logits (P, B, Q, N), pred_boxes (P, B, Q, 4) -> (4, M)
        int64 on their device, per match its set, image, query and object (an index into the batch's objects,
        concatenated). The costs of all sets come to the CPU in one copy."""
        P, B, Q = logits.shape[:3]
        prob = logits.flatten(0, 2).float().sigmoid()
        boxes = pred_boxes.flatten(0, 2).float()
        labels = torch.cat([t["class_labels"] for t in targets]).long()
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()
        negative = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        class_cost = positive[:, labels] - negative[:, labels]
        bbox_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
        # a non-finite cost (a diverging prediction) must not break the assignment
        big = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).view(P, B, Q, -1)
        return _assign(cost, [len(t["boxes"]) for t in targets])


@torch.compiler.disable  # scipy on the CPU: left out of torch.compile's graphs on purpose, not by a failed trace
def _assign(cost: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """cost (P, B, Q, sum(sizes)) -> the cheapest assignment of each image's sizes[i] objects, per set, as the
    (4, M) index of `HungarianMatcher.match`, on cost's device."""
    # by name: transformers' remote-code check scans the files for import statements, and people who only run
    # inference from the Hub must not need scipy
    linear_sum_assignment = importlib.import_module("scipy.optimize").linear_sum_assignment
    starts = np.cumsum([0, *sizes])
    matches = []
    for p, set_cost in enumerate(cost.cpu().numpy()):
        for b, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
            queries, objects = linear_sum_assignment(set_cost[b, :, start:end])
            matches.append(np.stack([np.full_like(queries, p), np.full_like(queries, b), queries, objects + start]))
    return torch.from_numpy(np.concatenate(matches, 1)).to(cost.device, non_blocking=True)


def _num_boxes(targets, device) -> float:
    """Objects in the batch, averaged over processes (at least 1), so every process divides alike."""
    count = float(sum(len(t["class_labels"]) for t in targets))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return max(count, 1.0)
    total = torch.tensor([count], device=device)
    torch.distributed.all_reduce(total)
    return max(total.item() / torch.distributed.get_world_size(), 1.0)


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

    def stacked(self, logits, pred_boxes, targets, num_boxes):
        """The loss terms of P prediction sets matched to the same targets, computed together: logits (P, B, Q, N),
        pred_boxes (P, B, Q, 4) -> {name in MAIN_TERMS: (P,)}. The focal, L1 and GIoU terms are sums divided by
        num_boxes (the batch's objects, averaged over processes); cardinality_error is logged, not trained on."""
        P, B, Q = logits.shape[:3]
        sets, images, queries, objects = self.matcher.match(logits, pred_boxes, targets)
        labels = torch.cat([t["class_labels"] for t in targets]).long()
        boxes = torch.cat([t["boxes"] for t in targets])
        onehot = torch.zeros_like(logits)
        onehot[sets, images, queries, labels[objects]] = 1.0
        predicted = pred_boxes[sets, images, queries]
        wanted = boxes[objects].to(predicted.dtype)
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(wanted))
        if self.classification_loss == "focal":
            loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha)
        else:
            iou = torch.zeros(P, B, Q, 1, dtype=logits.dtype, device=logits.device)
            iou[sets, images, queries, 0] = paired_box_iou(
                box_cxcywh_to_xyxy(predicted.detach()), box_cxcywh_to_xyxy(wanted)
            ).to(iou.dtype)
            loss_ce = iou_aware_bce_loss(logits, onehot, iou, self.focal_alpha)
        loss_ce = loss_ce.flatten(1).sum(1) / num_boxes

        def per_set(matched):  # (M,) one value per match -> (P,) their sums in fp32 (each query matches once)
            dense = torch.zeros(P, B, Q, dtype=torch.float32, device=matched.device)
            return dense.index_put((sets, images, queries), matched.float()).flatten(1).sum(1)

        loss_bbox = per_set((predicted - wanted).abs().sum(-1)) / num_boxes
        loss_giou = per_set(1 - giou) / num_boxes
        with torch.no_grad():
            predicted_count = (logits.sigmoid().max(-1).values > 0.5).sum(-1).float()  # (P, B)
            true_count = torch.tensor([float(len(t["class_labels"])) for t in targets])
            true_count = true_count.to(logits.device, non_blocking=True)
            cardinality = (predicted_count - true_count).abs().mean(-1)
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou, "cardinality_error": cardinality}

    def forward(
        self, logits, pred_boxes, targets, auxiliary_outputs=(), enc_logits=None, enc_boxes=None, query_groups=1
    ):
        """
        Args:
            logits (B, Q, N), pred_boxes (B, Q, 4): the last decoder layer.
            targets: per image {"class_labels" (T,) int64, "boxes" (T, 4)}.
            auxiliary_outputs: the earlier layers, each {"logits", "pred_boxes"}.
            enc_logits (B, S, N), enc_boxes (B, S, 4): two-stage proposals, matched class-agnostically.
            query_groups: G, the queries split into G groups of Q / G (Group DETR), each matched one-to-one to the
                targets on its own (all in one matching); the first group's terms have the names of MAIN_TERMS, the
                others' the suffix `_group{g}`, and the total counts each group's decoder terms divided by G.
        Returns:
            the weighted total loss (scalar) and every term in a dict.
        """
        self.check_targets(targets, logits.shape[-1], logits.shape[0])
        num_boxes = _num_boxes(targets, logits.device)
        auxiliary_outputs = list(auxiliary_outputs or ())
        layers = [""] + [f"_{i}" for i in range(len(auxiliary_outputs))]
        layer_logits = torch.stack([logits] + [aux["logits"] for aux in auxiliary_outputs])
        layer_boxes = torch.stack([pred_boxes] + [aux["pred_boxes"] for aux in auxiliary_outputs])
        # the decoder layers' sets together (the last layer first, each layer's groups in turn), their total
        # divided by the groups; then the proposals'
        groups = [
            (
                [layer + (f"_group{g}" if g else "") for layer in layers for g in range(query_groups)],
                _split_groups(layer_logits, query_groups),
                _split_groups(layer_boxes, query_groups),
                targets,
                query_groups,
            )
        ]
        if enc_logits is not None:
            foreground = [{**t, "class_labels": torch.zeros_like(t["class_labels"])} for t in targets]
            groups.append((["_enc"], enc_logits[None], enc_boxes[None], foreground, 1))
        total, terms = 0, {}
        for suffixes, set_logits, set_boxes, set_targets, share in groups:
            stacked = self.stacked(set_logits, set_boxes, set_targets, num_boxes)
            total = total + sum(stacked[name].sum() * weight for name, weight in self.weights.items()) / share
            for index, suffix in enumerate(suffixes):  # each set's terms, as scalars of their own
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
