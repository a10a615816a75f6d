"""Convergence of the training recipes: test mAP against optimiser steps and wall time, over several seeds, on the
CPU, for the paper's recipe, `--training_recipe fast` and each training-only option on its own.

Datasets (each generated or read once into OUTPUT/data/NAME):
  shapes    the demo's data (1,500 training images of 128 px: circles, squares, triangles apart), from scratch
  crowded   harder: 192 px images of about 24 small shapes of 12 kinds (sides 10-28 px, overlapping up to an IoU of
            0.3), from scratch
  bccd      the BCCD blood-cell images (Pascal VOC: red and white cells, platelets), from scratch at 256 px
  finetune  the demo's model (the paper recipe's shapes run at its last budget, seed 0) moved to a label set of four
            new shapes (diamond, star, cross, ring), 300 training images: as a user fine-tunes a COCO model

Each (dataset, recipe, seed, budget) is one training run of `budget` optimiser steps, its lr schedule fitted to
that budget as a user with that budget would run it, then scored on held-out test images with pycocotools. The
wall time is the training command's (the model's set-up to its saved output, no test scoring). Each run's result
is appended to OUTPUT/results.jsonl as it ends, so an interrupted benchmark goes on where it stopped; the tables
(mean and min-max over the seeds) go to OUTPUT/report.md and the curves (mAP against steps and against seconds) to
OUTPUT/DATASET.png.

Example (the figures in docs/training.md):
  python scripts/convergence.py --datasets shapes crowded bccd finetune --recipes paper fast --seeds 0 1 2
  python scripts/convergence.py --datasets shapes --recipes paper hybrid groups iou_aware --budgets 451
"""

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
from datasets import DatasetDict

from deformable_detr.apps.cli import HelpFormatter
from deformable_detr.apps.evaluate import evaluate_saved_model
from deformable_detr.data.shapes import KINDS, shapes_dataset
from deformable_detr.engine import TrainingOptions, train

FINETUNE_START = ("shapes", "paper", 0, 752)  # the run whose model the finetune case starts from
BCCD = ("../shared/datasets/bccd", "tests/data/bccd")  # the whole set where it is, else the vendored subset

# each training-only option on its own, at sizes for these small models (30-100 queries), and the recipes
RECIPES = {
    "paper": {},
    "fast": {"training_recipe": "fast"},
    "hybrid": {"hybrid_queries": 150, "hybrid_repeats": 6},
    "groups": {"query_groups": 3},
    "iou_aware": {"classification_loss": "iou_aware"},
    "one_to_many": {"one_to_many_heads": True},
    "ema": {"ema_decay": 0.999},
    "cosine": {"lr_scheduler": "cosine", "warmup_steps": 50},
}


@dataclass
class Benchmark:
    """One dataset of the benchmark: its training options (beside the recipe's, the seed, the steps and the
    output), the budgets in optimiser steps, and how to make its data."""

    options: dict
    budgets: list[int]
    images: dict = field(default_factory=dict)  # split -> number of generated images
    drawing: dict = field(default_factory=dict)  # shapes_dataset's max_objects, kinds, sides, overlap, stop


DEMO = {  # the demo's run (scripts/demo.py): the tiny preset, box refinement, batch 8, no augmentation
    "config_name": "tiny",
    "config_overrides": {"num_queries": 30, "with_box_refine": True},
    "image_size": 128,
    "max_image_size": 128,
    "per_device_train_batch_size": 8,
    "no_augmentation": True,
    "learning_rate": 5e-4,
    "backbone_learning_rate": 5e-4,
}
BENCHMARKS = {
    "shapes": Benchmark(DEMO, [226, 451, 752], {"train": 1500, "validation": 50, "test": 200}),
    "crowded": Benchmark(
        DEMO
        | {"config_overrides": {"num_queries": 100, "with_box_refine": True}, "image_size": 192}
        | {"max_image_size": 192},
        [300, 600],
        {"train": 1200, "validation": 50, "test": 200},
        {"max_objects": 40, "kinds": KINDS, "sides": (10, 28), "overlap": 0.3, "stop": 0.03},
    ),
    "bccd": Benchmark(
        DEMO
        | {"config_overrides": {"num_queries": 100, "with_box_refine": True}, "image_size": 256}
        | {"max_image_size": 342, "no_augmentation": False, "per_device_train_batch_size": 4},
        [300, 600],
    ),
    "finetune": Benchmark(
        {k: v for k, v in DEMO.items() if k not in ("config_name", "config_overrides")} | {"learning_rate": 2e-4},
        [60, 150],
        {"train": 300, "validation": 50, "test": 200},
        {"kinds": ["diamond", "star", "cross", "ring"]},
    ),
}


def recipe_of_text(text: str) -> tuple[str, dict]:
    """ "NAME:OPTION=VALUE,..." -> (NAME, {OPTION: VALUE}), each value read as JSON where it is JSON, else a string."""
    name, _, pairs = text.partition(":")
    options = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--recipes", nargs="+", default=["paper", "fast"], help=f"of {', '.join(RECIPES)}")
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME:OPTION=VALUE,...",
        help="one more recipe to try, e.g. hybrid300:hybrid_queries=300,hybrid_repeats=4 (values read as JSON)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", type=int, help="optimiser steps instead of each dataset's own")
    parser.add_argument("--output_dir", default="outputs/convergence", help="data, runs, results.jsonl, report")
    parser.add_argument(
        "--recipe_budgets",
        nargs="+",
        default=[],
        metavar="RECIPE=STEPS,...",
        help="a recipe only at these of the budgets, e.g. fast=451 (the others at all of them)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, the CPU's cores shared among them")
    parser.add_argument("--keep_models", action="store_true", help="keep every run's model, not only finetune's")
    args = parser.parse_args()
    RECIPES.update(recipe_of_text(text) for text in args.recipe)
    args.recipe_budgets = {
        recipe: [int(steps) for steps in budgets.split(",")]
        for recipe, _, budgets in (text.partition("=") for text in args.recipe_budgets)
    }
    unknown = [name for name in args.recipes if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}: choose from {', '.join(RECIPES)} or define it with --recipe")
    return args


def make_data(name: str, benchmark: Benchmark, folder: str) -> str:
    """The dataset's folder (a save_to_disk DatasetDict, or the BCCD folder), made once."""
    if name == "bccd":
        return next(path for path in BCCD if os.path.isdir(path))
    if not os.path.isdir(folder):
        size, first_seed = benchmark.options["image_size"], 10 if name == "finetune" else 0  # other images
        splits = {
            split: shapes_dataset(count, size, seed=first_seed + offset, **benchmark.drawing)
            for offset, (split, count) in enumerate(benchmark.images.items())
        }
        DatasetDict(splits).save_to_disk(folder)
    return folder


@dataclass
class Run:
    """One training run of the benchmark."""

    dataset: str
    recipe: str
    seed: int
    budget: int
    options: dict  # the dataset's and the recipe's training options
    data: str
    output_dir: str
    keep: bool  # keep the trained model

    @property
    def key(self) -> tuple:
        return self.dataset, self.recipe, self.seed, self.budget


def train_and_score(run: Run) -> dict:
    """One training run and its test mAP -> the results.jsonl record."""
    shutil.rmtree(run.output_dir, ignore_errors=True)
    started = time.perf_counter()
    train(
        TrainingOptions(
            dataset=run.data,
            output_dir=run.output_dir,
            max_steps=run.budget,
            seed=run.seed,
            num_workers=0,  # in a pool's process, where a loader worker could not start
            checkpointing_steps="no",
            eval_every_epochs=0,
            logging_steps=50,
            **run.options,
        )
    )
    seconds = time.perf_counter() - started
    metrics = evaluate_saved_model(run.output_dir, run.data, "test")
    if not run.keep:
        shutil.rmtree(run.output_dir, ignore_errors=True)
    record = dict(zip(("dataset", "recipe", "seed", "steps"), run.key))
    return record | {"seconds": seconds, "map": metrics["map"], "map_50": metrics["map_50"]}


def run_folder(args, key: tuple) -> str:
    """Where the run of key (dataset, recipe, seed, budget) trains."""
    name, recipe, seed, budget = key
    return os.path.join(args.output_dir, "runs", f"{name}-{recipe}-seed{seed}-{budget}")


def runs_of(name: str, args, data: str, model: str | None) -> list[Run]:
    """The dataset's runs: each budget, seed and recipe."""
    runs = []
    for budget in sorted(args.budgets or BENCHMARKS[name].budgets, reverse=True):  # the longest runs first
        for seed in args.seeds:
            for recipe in args.recipes:
                if budget not in args.recipe_budgets.get(recipe, [budget]):
                    continue
                options = BENCHMARKS[name].options | RECIPES[recipe] | ({"model_name_or_path": model} if model else {})
                output = run_folder(args, (name, recipe, seed, budget))
                keep = args.keep_models or (name, recipe, seed, budget) == FINETUNE_START
                runs.append(Run(name, recipe, seed, budget, options, data, output, keep))
    return runs


def done_runs(path: str) -> dict:
    """(dataset, recipe, seed, steps) -> record, of the runs results.jsonl holds."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {(r["dataset"], r["recipe"], r["seed"], r["steps"]): r for r in records}


def finetune_start(args) -> str:
    """The demo's trained model: the paper recipe's shapes run at its last budget, seed 0 (trained first)."""
    name, recipe, seed, budget = FINETUNE_START
    data = make_data(name, BENCHMARKS[name], os.path.join(args.output_dir, "data", name))
    run = Run(name, recipe, seed, budget, BENCHMARKS[name].options, data, run_folder(args, FINETUNE_START), True)
    if not os.path.isfile(os.path.join(run.output_dir, "model.safetensors")):
        append(os.path.join(args.output_dir, "results.jsonl"), train_and_score(run))
    return run.output_dir


def append(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(records: list[dict], path: str):
    """Per dataset, a table of mAP (mean, min-max over seeds) and seconds per recipe and budget."""
    lines = []
    for name in dict.fromkeys(r["dataset"] for r in records):
        mine = [r for r in records if r["dataset"] == name]
        budgets = sorted({r["steps"] for r in mine})
        lines += [f"\n### {name}\n", "| recipe | " + " | ".join(f"{b} steps: mAP, seconds" for b in budgets) + " |"]
        lines.append("|---" * (len(budgets) + 1) + "|")
        for recipe in dict.fromkeys(r["recipe"] for r in mine):
            cells = []
            for budget in budgets:
                runs = [r for r in mine if r["recipe"] == recipe and r["steps"] == budget]
                seconds = statistics.median(r["seconds"] for r in runs) if runs else None
                seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
                cells.append(f"{spread([r['map'] for r in runs])}, {seconds:.0f} s ({seeds})" if runs else "")
            lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(text)


def plot(records: list[dict], folder: str):
    """OUTPUT/DATASET.png: mean test mAP against steps and against seconds, a line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in dict.fromkeys(r["dataset"] for r in records):
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        for recipe in dict.fromkeys(r["recipe"] for r in records if r["dataset"] == name):
            runs = [r for r in records if r["dataset"] == name and r["recipe"] == recipe]
            budgets = sorted({r["steps"] for r in runs})
            means = [statistics.mean(r["map"] for r in runs if r["steps"] == b) for b in budgets]
            seconds = [statistics.median(r["seconds"] for r in runs if r["steps"] == b) for b in budgets]
            axes[0].plot(budgets, means, marker="o", label=recipe)
            axes[1].plot(seconds, means, marker="o", label=recipe)
        for axis, label in zip(axes, ("optimiser steps", "training seconds (CPU)")):
            axis.set(xlabel=label, ylabel="test mAP@[.5:.95]", title=name)
            axis.grid(alpha=0.3)
        axes[0].legend()
        figure.tight_layout()
        figure.savefig(os.path.join(folder, f"{name}.png"), dpi=100)
        plt.close(figure)


def main():
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    results = os.path.join(args.output_dir, "results.jsonl")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    spawn = get_context("spawn")
    with ProcessPoolExecutor(args.jobs, spawn, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        for name in args.datasets:
            model = finetune_start(args) if name == "finetune" else None
            data = make_data(name, BENCHMARKS[name], os.path.join(args.output_dir, "data", name))
            done = done_runs(results)
            runs = [
                pool.submit(train_and_score, run) for run in runs_of(name, args, data, model) if run.key not in done
            ]
            for finished in as_completed(runs):  # each recorded as it ends
                record = finished.result()
                append(results, record)
                print(json.dumps(record), flush=True)
    records = [r for r in done_runs(results).values() if r["dataset"] in args.datasets and r["recipe"] in args.recipes]
    report(records, os.path.join(args.output_dir, "report.md"))
    plot(records, args.output_dir)


if __name__ == "__main__":
    main()
