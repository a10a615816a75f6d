"""MS-DETR's one-to-many heads (engine/one_to_many_heads.py): training-only class and box heads on the model's own
queries, trained one-to-many; the saved model stays a plain Deformable DETR."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deformable_detr import DeformableDetrForObjectDetection
from deformable_detr.engine import train
from deformable_detr.engine.one_to_many_heads import OneToManyHeads
from deformable_detr.engine.query_groups import FILE, TrainingQueries
from tests.support.batches import LABELS, images
from tests.support.models import tiny_model
from tests.support.training import options


def loss_of(queries: TrainingQueries, model, labels=LABELS):
    """The training loss of `model` on the test images, through `queries`."""
    return queries(model, images(), None, labels)


@pytest.mark.parametrize(
    "variant", [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}], ids=str
)
def test_the_heads_predict_as_the_model_heads_do(variant):
    """Heads holding the model's own heads' weights give the model's predictions at every layer, the last layer
    first: their boxes are relative to the reference each layer received, as the model's are."""
    model = tiny_model(decoder_layers=3, **variant)
    heads = OneToManyHeads(model.config)
    assert len(heads.class_embed) == (3 if variant else 1)
    with torch.no_grad():
        for index, (class_head, box_head) in enumerate(zip(heads.class_embed, heads.bbox_embed)):
            class_head.load_state_dict(model.class_head(index).state_dict())
            box_head.load_state_dict(model.box_head(index).state_dict())
        outputs = model(images(), output_auxiliary=True)
        logits, boxes = heads(outputs, model.config.num_queries)
    layers = [(outputs.logits, outputs.pred_boxes)] + [
        (a["logits"], a["pred_boxes"]) for a in outputs.auxiliary_outputs
    ]
    assert logits.shape == (3, 2, model.config.num_queries, model.config.num_labels)
    for layer, (own_logits, own_boxes) in enumerate(layers):
        torch.testing.assert_close(logits[layer], own_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(boxes[layer], own_boxes, rtol=0, atol=1e-6)


def test_the_heads_start_as_the_paper_starts_the_model_heads():
    """Class biases at the prior probability 0.01, box heads' last layer zero: the first boxes are the references,
    sizes sigmoid(-2)."""
    heads = OneToManyHeads(tiny_model().config)
    torch.testing.assert_close(heads.class_embed[0].bias.sigmoid(), torch.full((3,), 0.01))
    assert not heads.bbox_embed[0].layers[-1].weight.any()
    assert heads.bbox_embed[0].layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]


def test_terms_are_named_and_weighted_and_the_model_terms_stay():
    """The heads' terms carry the suffix _one_to_many at every layer, count one_to_many_loss_weight in the total,
    and the model's own terms are the plain model's (in eval mode: no dropout)."""
    model = tiny_model()
    own = model(images(), labels=LABELS)
    queries = TrainingQueries(model.config, one_to_many_heads=True, one_to_many_repeats=3, one_to_many_loss_weight=0.5)
    ours = loss_of(queries, model)
    assert list(ours.loss_dict) == list(own.loss_dict) + [name + "_one_to_many" for name in own.loss_dict]
    for name in own.loss_dict:
        torch.testing.assert_close(ours.loss_dict[name], own.loss_dict[name], rtol=0, atol=0)
    weights = {"loss_ce": 1.0, "loss_bbox": model.config.bbox_loss_coefficient, "loss_giou": 2.0}
    many = sum(ours.loss_dict[n + layer + "_one_to_many"] * w for n, w in weights.items() for layer in ("", "_0"))
    torch.testing.assert_close(ours.loss, own.loss + 0.5 * many, rtol=1e-6, atol=1e-6)
    # one-to-many: as many matches as the 7 queries allow against 3 objects repeated 3 times
    ours.loss.backward()
    assert queries.one_to_many.class_embed[0].weight.grad.abs().sum() > 0
    assert model.model.decoder.layers[0].ffn.linear1.weight.grad.abs().sum() > 0


def test_the_heads_train():
    """Twenty Adam steps on one batch, the model frozen but its decoder: the heads' one-to-many loss falls."""
    model = tiny_model().train()
    model.requires_grad_(False)
    model.model.decoder.requires_grad_(True)
    torch.manual_seed(4)
    queries = TrainingQueries(model.config, one_to_many_heads=True, one_to_many_repeats=2)
    optimiser = torch.optim.Adam([*queries.parameters(), *model.model.decoder.parameters()], lr=1e-3)
    history = []
    for _ in range(20):
        torch.manual_seed(5)  # the same dropout every step
        terms = loss_of(queries, model).loss_dict
        loss = sum(v for k, v in terms.items() if k.endswith("_one_to_many") and "cardinality" not in k)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history


def test_the_saved_model_is_plain_and_predicts_as_trained(tmp_path):
    """After steps with the heads, the saved model has a plain model's keys, and loaded back it predicts what the
    trained network predicts without them."""
    model = tiny_model(with_box_refine=True).train()
    queries = TrainingQueries(model.config, one_to_many_heads=True)
    optimiser = torch.optim.AdamW([*model.parameters(), *queries.parameters()], lr=1e-3)
    for _ in range(2):
        loss_of(queries, model).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval().save_pretrained(tmp_path / "trained")
    tiny_model(with_box_refine=True).save_pretrained(tmp_path / "plain")
    trained, plain = (load_file(tmp_path / name / "model.safetensors") for name in ("trained", "plain"))
    assert trained.keys() == plain.keys() and all(trained[k].shape == plain[k].shape for k in plain)
    assert not any("one_to_many" in key for key in trained)
    loaded = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        expected, got = model(images()), loaded(images())
    assert torch.equal(expected.logits, got.logits) and torch.equal(expected.pred_boxes, got.pred_boxes)


def test_training_with_the_heads_resumes_exactly(shapes_folder, tmp_path):
    """Four steps with the heads and a checkpoint after two, resumed, give the weights of four in one go; the
    checkpoint keeps the heads, the saved model has a plain model's keys; resumed without the heads: refused."""
    heads = dict(one_to_many_heads=True, one_to_many_repeats=2)
    common = dict(max_steps=4, per_device_train_batch_size=1, eval_every_epochs=0)
    train(options(shapes_folder, tmp_path / "whole", **common, **heads, checkpointing_steps=2))
    saved = load_file(tmp_path / "whole" / "checkpoint-2" / FILE)
    assert saved and all(name.startswith("one_to_many.") for name in saved)
    resumed = dict(common, resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    train(options(shapes_folder, tmp_path / "resumed", **resumed, **heads))
    whole, again = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "resumed"))
    assert whole.keys() == again.keys() and not any("one_to_many" in key for key in whole)
    for key in whole:
        assert torch.equal(whole[key], again[key]), key
    assert "loss_ce_one_to_many" in json.load(open(tmp_path / "whole" / "history.json"))[0]
    assert "MS-DETR's one-to-many heads (each box repeated 2 times" in (tmp_path / "whole" / "README.md").read_text()
    with pytest.raises(
        ValueError, match="0 extra learned queries and one-to-many heads .* this run has 0 extra learned queries and no"
    ):
        train(options(shapes_folder, tmp_path / "other", **resumed))
