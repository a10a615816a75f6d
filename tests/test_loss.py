"""The loss: hand-made cases, and the same total and terms as transformers' loss."""

import pytest
import torch

from deformable_detr import from_transformers
from deformable_detr.model.box_ops import box_xyxy_to_cxcywh, generalized_box_iou
from deformable_detr.model.loss_deformable_detr import HungarianMatcher
from deformable_detr.testing import padded_batch, small_hf_model
from tests.support.models import tiny_model


def labels():
    return [
        {
            "class_labels": torch.tensor([1, 3, 0]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.9, 0.9]]),
        },
        {"class_labels": torch.tensor([4]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1]])},
    ]


@pytest.mark.parametrize("variant", ["multi-scale", "single-scale", "box-refine"])
def test_same_loss_as_transformers(variant):
    hf = small_hf_model(variant, auxiliary_loss=True)
    ours = from_transformers(hf)
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        theirs = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels())
        mine = ours(pixel_values, pixel_mask, labels=labels())
    assert abs(theirs.loss.item() - mine.loss.item()) <= 1e-5 * abs(theirs.loss.item())
    assert set(theirs.loss_dict) == set(mine.loss_dict)
    for name, value in theirs.loss_dict.items():
        assert abs(value.item() - mine.loss_dict[name].item()) <= 1e-5 * max(abs(value.item()), 1e-6), name


def test_perfect_predictions_have_no_box_loss_and_match_one_to_one():
    matcher = HungarianMatcher()
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 2, 1] = logits[0, 0, 0] = 10.0
    pred = torch.tensor([[[0.7, 0.6, 0.3, 0.2], [0.1, 0.1, 0.1, 0.1], [0.3, 0.4, 0.2, 0.3], [0.9, 0.9, 0.1, 0.1]]])
    queries, objects = matcher(logits, pred, [{"class_labels": torch.tensor([1, 0]), "boxes": boxes}])[0]
    assert dict(zip(queries.tolist(), objects.tolist())) == {0: 1, 2: 0}
    from deformable_detr.model.loss_deformable_detr import DeformableDetrLoss

    model = tiny_model()
    loss, terms = DeformableDetrLoss(model.config)(
        logits, pred, [{"class_labels": torch.tensor([1, 0]), "boxes": boxes}]
    )
    assert terms["loss_bbox"].item() == 0 and abs(terms["loss_giou"].item()) < 1e-6 and terms["loss_ce"].item() < 1e-3


def test_images_without_objects_and_non_finite_predictions():
    model = tiny_model(with_box_refine=True, two_stage=True).train()
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = model(torch.randn(2, 3, 96, 128), labels=empty)
    assert torch.isfinite(out.loss) and out.loss.item() > 0 and "loss_ce_enc" in out.loss_dict
    logits = torch.tensor([[[float("nan")], [0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, float("inf"), 0.1], [0.5, 0.5, 0.2, 0.2]]])
    queries, _ = HungarianMatcher()(
        logits, boxes, [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    )[0]
    assert queries.tolist() == [1]


def test_two_stage_has_the_encoder_proposal_loss_that_transformers_lacks():
    model = tiny_model(with_box_refine=True, two_stage=True)
    target = {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1]])}
    out = model(torch.randn(2, 3, 96, 128), labels=[target, target])
    enc = {k for k in out.loss_dict if k.endswith("_enc")}
    assert enc == {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"}
    out.loss.backward()
    assert model.model.enc_class_embed.weight.grad.abs().sum() > 0


def test_generalized_box_iou_on_known_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 5.0, 5.0]])
    giou = generalized_box_iou(a, b)[0]
    assert torch.allclose(giou, torch.tensor([1 / 7 - 2 / 9, 1.0, 0 - (25 - 5) / 25]))


def test_bad_labels_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"labels\[0\] has class id 3, outside the model's 3 classes"):
        model(torch.randn(2, 3, 64, 64), labels=labels())
    with pytest.raises(ValueError, match=r"labels\[0\]: boxes must be"):
        model(torch.randn(1, 3, 64, 64), labels=[{"class_labels": torch.tensor([0]), "boxes": torch.zeros(1, 2)}])
    # labels that would give a loss from broadcast targets, a NaN loss, a loss of pixel boxes, truncated class ids
    one = {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(ValueError, match="labels must be a list of 2 dicts, one per image of the batch, got 1 of them"):
        model(torch.randn(2, 3, 64, 64), labels=[one])
    with pytest.raises(ValueError, match="labels must be a list of 1 dicts, one per image of the batch, got dict"):
        model(torch.randn(1, 3, 64, 64), labels=one)
    for boxes, shown in (
        ([[5.0, 5.0, 2.0, 2.0]], r"\[5.0, 5.0, 2.0, 2.0\]"),
        ([[0.5, float("nan"), 0.1, 0.1]], r"\[0.5, nan"),
    ):
        with pytest.raises(ValueError, match=rf"labels\[0\] has the box {shown}.*normalised to \[0, 1\]"):
            model(torch.randn(1, 3, 64, 64), labels=[one | {"boxes": torch.tensor(boxes)}])
    with pytest.raises(ValueError, match=r"labels\[0\]\['class_labels'\] must be a \(T,\) tensor of integer class ids"):
        model(torch.randn(1, 3, 64, 64), labels=[one | {"class_labels": torch.tensor([1.7])}])
    with pytest.raises(ValueError, match=r"labels\[0\] must be a dict, got list"):
        model(torch.randn(1, 3, 64, 64), labels=[[0, 0.5, 0.5, 0.2, 0.2]])


def test_a_bf16_model_sums_its_box_terms_in_fp32_and_terms_are_scalars_of_their_own():
    """The box terms of 300 matched queries add up in fp32 whatever the predictions' type: summed in bf16 one
    match at a time, loss_giou comes out 8 % high. The terms come in transformers' order (the last layer's, then
    each earlier layer's) and each is a tensor of its own, which a user may change in place."""
    from types import SimpleNamespace

    from deformable_detr.model.loss_deformable_detr import DeformableDetrLoss

    config = SimpleNamespace(
        class_cost=2.0,
        bbox_cost=5.0,
        giou_cost=2.0,
        focal_alpha=0.25,
        bbox_loss_coefficient=5.0,
        giou_loss_coefficient=2.0,
    )
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 300, 4, generator=g), torch.randn(2, 300, 4, generator=g).sigmoid()
    targets = [
        {
            "class_labels": torch.randint(0, 4, (150,), generator=g),
            "boxes": torch.cat(
                [torch.rand(150, 2, generator=g) * 0.5 + 0.25, torch.rand(150, 2, generator=g) * 0.3 + 0.05], 1
            ),
        }
        for _ in range(2)
    ]
    aux = [{"logits": logits, "pred_boxes": boxes}]
    _, exact = DeformableDetrLoss(config)(
        logits.double(), boxes.double(), targets, [{"logits": logits.double(), "pred_boxes": boxes.double()}]
    )
    _, terms = DeformableDetrLoss(config)(
        logits.bfloat16(), boxes.bfloat16(), targets, [{k: v.bfloat16() for k, v in aux[0].items()}]
    )
    for name in ("loss_bbox", "loss_giou"):
        assert abs(terms[name].item() - exact[name].item()) <= 1e-2 * exact[name].item(), name
    assert list(terms)[:5] == ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "loss_ce_0"]
    terms["loss_ce"].mul_(2)  # its own storage: no error, and the earlier layer's term keeps its value
    assert terms["loss_ce_0"].item() == pytest.approx(terms["loss_ce"].item() / 2, rel=1e-2)


def test_corner_boxes_are_refused_with_that_explanation():
    """Normalised corners (x0, y0, x1, y1) given as labels are refused: most of them run past the image read as
    (cx, cy, w, h). One box that runs past among boxes that fit is left alone (a box at the border)."""
    model = tiny_model()
    corners = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.3, 0.3, 0.9, 0.8], [0.05, 0.5, 0.4, 0.95]])
    labels = [{"class_labels": torch.tensor([0, 1, 2]), "boxes": corners}]
    message = (
        r"3 of the labels' 3 boxes run past their image as \(cx, cy, w, h\) but fit it as corners \(x0, y0, x1, y1\), "
        r"e.g. \[0.1.*box_xyxy_to_cxcywh converts corners"
    )
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 64, 64), labels=labels)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64), labels=[labels[0] | {"boxes": box_xyxy_to_cxcywh(corners)}])
        border = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.02, 0.5, 0.1, 0.3]])
        model(torch.randn(1, 3, 64, 64), labels=[labels[0] | {"boxes": border}])


def random_targets(sizes, generator, classes=5):
    return [
        {
            "class_labels": torch.randint(0, classes, (n,), generator=generator),
            "boxes": torch.cat(
                [
                    torch.rand(n, 2, generator=generator) * 0.5 + 0.25,
                    torch.rand(n, 2, generator=generator) * 0.3 + 0.05,
                ],
                1,
            ),
        }
        for n in sizes
    ]


@pytest.mark.parametrize("sizes", [[4, 7], [0, 3]])
def test_one_matching_of_groups_hybrid_and_proposals_equals_a_matching_for_each(sizes):
    """Two query groups, the two-stage proposals and a hybrid set (objects repeated 3 times) in one `combined` call:
    the same terms and total as each matched on its own, the hybrid set against the objects written out 3 times
    (what the loss computed before all sets shared one matching), to fp32 precision."""
    from deformable_detr.model.loss_deformable_detr import DeformableDetrLoss, decoder_sets, model_sets

    g = torch.Generator().manual_seed(0)
    L, B, G, Q, H, k = 3, 2, 2, 20, 30, 3
    targets = random_targets(sizes, g)
    logits, boxes = (
        torch.randn(L, B, G * Q + H, 5, generator=g),
        torch.rand(L, B, G * Q + H, 4, generator=g) * 0.5 + 0.2,
    )
    enc_logits, enc_boxes = torch.randn(B, 50, 5, generator=g), torch.rand(B, 50, 4, generator=g) * 0.5 + 0.2
    loss = DeformableDetrLoss(tiny_model(num_labels=5).config)
    own = model_sets(logits[:, :, : G * Q], boxes[:, :, : G * Q], enc_logits, enc_boxes, G)
    hybrid = decoder_sets(logits[:, :, G * Q :], boxes[:, :, G * Q :], 1, "_hybrid", k, 0.5)
    total, terms = loss.combined([*own, hybrid], targets)
    repeated = [{"class_labels": t["class_labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    hybrid_alone = decoder_sets(logits[:, :, G * Q :], boxes[:, :, G * Q :], 1, "_hybrid", 1, 0.5)
    parts = [
        loss.combined([own[0]], targets),
        loss.combined([own[1]], targets),
        loss.combined([hybrid_alone], repeated),
    ]
    assert list(terms) == [name for _, part in parts for name in part]
    assert len(terms) == 4 * (L * G + 1 + L)
    for name, value in (parts[0][1] | parts[1][1] | parts[2][1]).items():
        torch.testing.assert_close(terms[name], value, rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(total, sum(part[0] for part in parts), rtol=1e-6, atol=1e-6)


def test_all_prediction_sets_share_one_host_copy_and_repeated_objects_match_k_times(monkeypatch):
    """One `combined` call over three PredictionSets copies the costs to the host once; with 12 queries and 2 + 1
    objects repeated 4 times, every object is matched to 4 queries of each image and each query once; the matches
    solved on several threads are those solved on one."""
    from deformable_detr.model import loss_deformable_detr
    from deformable_detr.model.loss_deformable_detr import DeformableDetrLoss, PredictionSets, decoder_sets

    g = torch.Generator().manual_seed(1)
    targets = random_targets([2, 1], g)
    logits, boxes = torch.randn(3, 2, 12, 5, generator=g), torch.rand(3, 2, 12, 4, generator=g) * 0.5 + 0.2
    sets = [
        decoder_sets(logits, boxes),
        decoder_sets(logits, boxes, 1, "_many", 4),
        PredictionSets(["_x"], logits[:1], boxes[:1]),
    ]
    assign, calls = loss_deformable_detr._assign, []
    monkeypatch.setattr(loss_deformable_detr, "_assign", lambda *a: calls.append(1) or assign(*a))
    DeformableDetrLoss(tiny_model(num_labels=5).config).combined(sets, targets)
    assert len(calls) == 1
    matcher = HungarianMatcher()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = matcher.match(sets, targets)
        torch.set_num_threads(2)
        threaded = matcher.match(sets, targets)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded))
    set_index, images, queries, objects = serial[1]
    for p in range(3):
        assert torch.bincount(objects[set_index == p], minlength=3).tolist() == [4, 4, 4]
        for b in range(2):
            chosen = queries[(set_index == p) & (images == b)]
            assert len(chosen) == len(set(chosen.tolist())) == 4 * len(targets[b]["boxes"])
    assert torch.equal(serial[0][2:], matcher.match([sets[0]], targets)[0][2:])
