"""Training-only queries and losses (engine/query_groups.py): Group DETR's groups, H-DETR's hybrid queries and the
IoU-aware classification loss; the saved model stays a plain Deformable DETR."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from deformable_detr import DeformableDetrForObjectDetection
from deformable_detr.engine import TrainingOptions, train
from deformable_detr.engine.query_groups import FILE, TrainingQueries, block_mask
from deformable_detr.model.loss_deformable_detr import DeformableDetrLoss, iou_aware_bce_loss
from tests.support.batches import LABELS, images
from tests.support.models import TINY_OVERRIDES, tiny_model
from tests.support.training import options


def queries_of(model, **kwargs) -> TrainingQueries:
    queries = TrainingQueries(model.config, **kwargs)
    torch.manual_seed(2)
    torch.nn.init.normal_(queries.query_embed.weight)
    return queries


def test_block_mask_keeps_each_set_to_itself():
    mask = block_mask([2, 1, 3])
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = expected[2:3, 2:3] = expected[3:, 3:] = True
    assert torch.equal(mask, expected)


def test_the_mask_keeps_groups_apart_and_the_model_queries_give_the_plain_model_outputs():
    """With two groups and a hybrid set, the model's own queries give exactly what the plain model gives, and
    changing a query of one set changes no other set's outputs."""
    model = tiny_model()
    queries = queries_of(model, query_groups=2, hybrid_queries=5)
    Q = model.config.num_queries

    def run(extra):
        embeds = torch.cat([model.model.query_embed.weight, extra])
        mask = block_mask(queries.sizes)[None].expand(2, -1, -1)
        with torch.no_grad():
            return model(images(), decoder_attention_mask=mask, query_embeds=embeds)

    with torch.no_grad():
        plain = model(images())
    both = run(queries.query_embed.weight)
    assert both.logits.shape[1] == 2 * Q + 5
    torch.testing.assert_close(both.logits[:, :Q], plain.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(both.pred_boxes[:, :Q], plain.pred_boxes, rtol=0, atol=1e-6)
    changed = queries.query_embed.weight.detach().clone()
    changed[Q] += 1.0  # the first query of the hybrid set
    other = run(changed)
    torch.testing.assert_close(other.logits[:, : 2 * Q], both.logits[:, : 2 * Q], rtol=0, atol=1e-6)
    assert not torch.allclose(other.logits[:, 2 * Q :], both.logits[:, 2 * Q :])


def test_without_extra_queries_the_outputs_and_loss_are_the_models_own():
    """Focal loss and no extra queries: TrainingQueries' loss is the model's own, term by term, bit for bit."""
    model = tiny_model().train()
    torch.manual_seed(3)
    own = model(images(), labels=LABELS)
    torch.manual_seed(3)
    ours = TrainingQueries(model.config)(model, images(), None, LABELS)
    assert torch.equal(own.loss, ours.loss)
    assert own.loss_dict.keys() == ours.loss_dict.keys()
    for name in own.loss_dict:
        assert torch.equal(own.loss_dict[name], ours.loss_dict[name]), name


def test_group_and_hybrid_terms_have_their_own_names_and_the_primary_terms_stay():
    """Two groups and a hybrid set (in eval mode: no dropout, whose draws depend on the number of queries)."""
    model = tiny_model()
    torch.manual_seed(3)
    own = model(images(), labels=LABELS)
    queries = queries_of(model, query_groups=2, hybrid_queries=6, hybrid_repeats=3, hybrid_loss_weight=0.5)
    torch.manual_seed(3)
    ours = queries(model, images(), None, LABELS)
    for name in own.loss_dict:
        for suffix in ("", "_group1", "_hybrid"):
            assert name + suffix in ours.loss_dict
    # the model's queries see only each other: their terms are the plain model's
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"):
        torch.testing.assert_close(ours.loss_dict[name], own.loss_dict[name], rtol=1e-5, atol=1e-6)
    weights = {"loss_ce": 1.0, "loss_bbox": model.config.bbox_loss_coefficient, "loss_giou": 2.0}
    layers = ["", "_0"]

    def total(suffix):
        return sum(ours.loss_dict[n + layer + suffix] * w for n, w in weights.items() for layer in layers)

    expected = (total("") + total("_group1")) / 2 + 0.5 * total("_hybrid")
    torch.testing.assert_close(ours.loss, expected, rtol=1e-5, atol=1e-5)
    ours.loss.backward()
    assert queries.query_embed.weight.grad.abs().sum() > 0


def test_iou_aware_loss_by_hand():
    """One image, one query matched with a known IoU: the terms and their gradients are RF-DETR's IA-BCE, written
    out (the target t held fixed, the negatives' weight p^2 differentiated)."""
    values = torch.tensor([[[0.5, -1.0], [2.0, 0.3]]])  # (B=1, Q=2, N=2)
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    iou = torch.tensor([[[0.25], [0.0]]])
    logits = values.clone().requires_grad_()
    loss = iou_aware_bce_loss(logits, onehot, iou, 0.25)
    loss.sum().backward()
    by_hand = values.clone().requires_grad_()
    p = by_hand.sigmoid()
    t = max(p[0, 0, 0].item() ** 0.25 * 0.25**0.75, 0.01)
    positive = -t * p[0, 0, 0].log() - (1 - t) * (1 - p[0, 0, 0]).log()
    negatives = -(p**2) * (1 - p).log()
    expected = torch.stack([positive, negatives[0, 0, 1], negatives[0, 1, 0], negatives[0, 1, 1]])
    expected.sum().backward()
    torch.testing.assert_close(loss.flatten(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, by_hand.grad, rtol=1e-5, atol=1e-6)


def test_iou_aware_loss_in_the_criterion_uses_the_matched_iou():
    """A prediction set of two queries, one object: the criterion's loss_ce is the IA-BCE of the matched query
    at its box's IoU with the object, summed, over one box."""
    config = tiny_model(num_labels=2).config
    logits = torch.tensor([[[3.0, -2.0], [-3.0, -2.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    target = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])}]
    _, terms = DeformableDetrLoss(config, "iou_aware")(logits, boxes, target)
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    iou = torch.tensor([[[0.5], [0.0]]])  # (0.2 * 0.2) / (0.4 * 0.2)
    torch.testing.assert_close(terms["loss_ce"], iou_aware_bce_loss(logits, onehot, iou).sum())


def test_options_are_off_by_default_and_checked():
    defaults = TrainingOptions(dataset="d", config_name="tiny")
    assert (defaults.hybrid_queries, defaults.query_groups, defaults.classification_loss) == (0, 1, "focal")
    with pytest.raises(ValueError, match="need hybrid_queries"):
        TrainingOptions(dataset="d", config_name="tiny", hybrid_repeats=3)
    with pytest.raises(ValueError, match="query_groups must be at least 1"):
        TrainingOptions(dataset="d", config_name="tiny", query_groups=0)
    with pytest.raises(ValueError, match="classification_loss"):
        TrainingOptions(dataset="d", config_name="tiny", classification_loss="varifocal")


def test_hybrid_training_saves_a_plain_model_and_resumes_exactly(shapes_folder, tmp_path):
    """Hybrid queries and two groups: the saved model has a plain model's keys and config; the checkpoint keeps
    the extra queries; four steps with a checkpoint after two, resumed, give the weights of four in one go."""
    common = dict(
        max_steps=4,
        per_device_train_batch_size=1,
        eval_every_epochs=0,
        hybrid_queries=12,
        hybrid_repeats=2,
        query_groups=2,
        classification_loss="iou_aware",
    )
    train(options(shapes_folder, tmp_path / "whole", **common, checkpointing_steps=2))
    train(options(shapes_folder, tmp_path / "plain", max_steps=1, eval_every_epochs=0, per_device_train_batch_size=1))
    whole, plain = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "plain" / "model.safetensors"),
    )
    assert whole.keys() == plain.keys()
    assert all(whole[k].shape == plain[k].shape for k in plain)
    configs = [json.load(open(tmp_path / run / "config.json")) for run in ("whole", "plain")]
    assert configs[0].keys() == configs[1].keys()
    assert load_file(tmp_path / "whole" / "checkpoint-2" / FILE)["query_embed.weight"].shape == (10 + 12, 64)
    DeformableDetrForObjectDetection.from_pretrained(tmp_path / "whole")  # loads as a plain model
    resumed = dict(common, resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    train(options(shapes_folder, tmp_path / "resumed", **resumed))
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in whole:
        assert torch.equal(whole[key], again[key]), key
    history = json.load(open(tmp_path / "whole" / "history.json"))
    assert "loss_ce_hybrid" in history[0]
    # a checkpoint with extra queries, resumed without them: refused, naming the options
    with pytest.raises(ValueError, match="query_groups, hybrid_queries"):
        train(
            options(
                shapes_folder,
                tmp_path / "other",
                max_steps=4,
                per_device_train_batch_size=1,
                eval_every_epochs=0,
                resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"),
            )
        )


def test_in_two_stage_the_extra_queries_are_further_proposals_kept_apart():
    """Two-stage: the groups and the hybrid set are the next top-scoring proposals (no learned queries), and under
    the block mask the model's own Q give exactly the plain model's outputs; without the mask they would not."""
    model = tiny_model(with_box_refine=True, two_stage=True)
    queries = TrainingQueries(model.config, query_groups=2, hybrid_queries=5)
    Q = model.config.two_stage_num_proposals
    assert queries.query_embed is None and not list(queries.parameters())
    inputs = queries.decoder_inputs(model, 2, None)
    assert inputs["num_proposals"] == 2 * Q + 5 and inputs["decoder_attention_mask"].shape == (2, 2 * Q + 5, 2 * Q + 5)
    with torch.no_grad():
        plain = model(images())
        masked = model(images(), **inputs)
        unmasked = model(images(), num_proposals=2 * Q + 5)
    assert masked.logits.shape[1] == 2 * Q + 5
    torch.testing.assert_close(masked.logits[:, :Q], plain.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked.pred_boxes[:, :Q], plain.pred_boxes, rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked.logits[:, :Q], plain.logits, atol=1e-4)
    with pytest.raises(ValueError, match="num_proposals=1000 exceeds the 108 encoder positions"):
        model(images(), num_proposals=1000)
    with pytest.raises(ValueError, match="num_proposals=3 selects two-stage proposals, which this model"):
        tiny_model()(images(), num_proposals=3)


def test_the_optimiser_step_clips_the_extra_queries_with_the_model():
    """A TrainingNetwork's step clips every parameter the optimiser steps: at the step, the gradients of the
    model and of the extra queries together have the norm max_grad_norm."""
    from accelerate import Accelerator

    from deformable_detr.engine.checkpoints import TrainState
    from deformable_detr.engine.query_groups import TrainingNetwork
    from deformable_detr.engine.trainer import TrainingStep

    model = tiny_model().train()
    network = TrainingNetwork(model, queries_of(model, hybrid_queries=4))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    norms = []

    def at_the_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    optimizer.register_step_pre_hook(at_the_step)
    step = TrainingStep(network, optimizer, scheduler, Accelerator(cpu=True), max_grad_norm=1e-3)
    batch = {"pixel_values": images(), "pixel_mask": torch.ones(2, 64, 80, dtype=torch.long), "labels": LABELS}
    outcome = step(batch, TrainState())
    assert network.queries.query_embed.weight.grad is None  # zeroed after the step, which it took part in
    assert outcome.grad_norm > 1e-2 and "loss_ce_hybrid" in outcome.loss_parts
    assert norms == [pytest.approx(1e-3, rel=1e-4)]


def test_two_stage_training_with_groups_and_hybrid_queries_saves_a_plain_model(shapes_folder, tmp_path):
    """Two-stage with two groups and hybrid queries trains (the hybrid terms logged) and saves exactly a plain
    model's weights: from_pretrained finds none missing and none unexpected."""
    overrides = "with_box_refine=true,two_stage=true,two_stage_num_proposals=10"
    run = dict(max_steps=2, per_device_train_batch_size=1, eval_every_epochs=0, hybrid_queries=6, query_groups=2)
    train(options(shapes_folder, tmp_path, f"{TINY_OVERRIDES},{overrides}", **run))
    steps = [h for h in json.load(open(tmp_path / "history.json")) if "loss" in h]
    assert len(steps) == 2
    assert all(math.isfinite(h[name]) for h in steps for name in ("loss", "loss_ce", "loss_ce_hybrid"))
    model, info = DeformableDetrForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert model.config.two_stage and not info["missing_keys"] and not info["unexpected_keys"]
    assert not (tmp_path / FILE).exists()
