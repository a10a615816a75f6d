"""scripts/convergence.py's bookkeeping: the recipes it is told of, the runs it plans, and the table it reports
(training itself is what the other tests check)."""

import importlib.util
import json
import os
import sys

import pytest


@pytest.fixture(scope="module")
def convergence():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "convergence.py")
    spec = importlib.util.spec_from_file_location("convergence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arguments(convergence, monkeypatch, *words):
    monkeypatch.setattr(sys, "argv", ["convergence.py", *words])
    return convergence.parse_args()


def test_a_recipe_of_text_reads_its_values_as_json(convergence):
    assert convergence.recipe_of_text("h300:hybrid_queries=300,classification_loss=iou_aware,ema_decay=0.9") == (
        "h300",
        {"hybrid_queries": 300, "classification_loss": "iou_aware", "ema_decay": 0.9},
    )


def test_the_runs_longest_first_each_recipe_at_its_budgets(convergence, monkeypatch):
    args = arguments(
        convergence, monkeypatch, "--recipes", "paper", "fast", "--seeds", "0", "1", "--recipe_budgets", "fast=451"
    )
    runs = convergence.runs_of("shapes", args, "data", None)
    assert [(r.budget, r.seed, r.recipe) for r in runs] == [
        (752, 0, "paper"),
        (752, 1, "paper"),
        (451, 0, "paper"),
        (451, 0, "fast"),
        (451, 1, "paper"),
        (451, 1, "fast"),
        (226, 0, "paper"),
        (226, 1, "paper"),
    ]
    assert runs[3].options["training_recipe"] == "fast" and runs[3].options["config_name"] == "tiny"
    assert [r.keep for r in runs[:2]] == [True, False]  # the finetune case's model is kept


def test_an_unknown_recipe_is_named(convergence, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        arguments(convergence, monkeypatch, "--recipes", "quick")
    assert "unknown recipe 'quick'" in capsys.readouterr().err


def test_the_report_gives_means_and_ranges_over_seeds(convergence, tmp_path):
    records = [
        {"dataset": "shapes", "recipe": "paper", "seed": s, "steps": 10, "seconds": 5.0 + s, "map": m}
        for s, m in enumerate([0.5, 0.7, 0.6])
    ] + [{"dataset": "shapes", "recipe": "fast", "seed": 0, "steps": 10, "seconds": 9.0, "map": 0.8}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    convergence.report(list(convergence.done_runs(str(path)).values()), str(tmp_path / "report.md"))
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "| paper | 0.600 (0.500-0.700), 6 s (3 seeds) |" in lines
    assert "| fast | 0.800 (0.800-0.800), 9 s (1 seed) |" in lines
