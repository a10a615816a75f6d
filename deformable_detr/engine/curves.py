"""`training.png`: a run's curves against the optimiser step, from its history (history.json): the loss terms, the
learning rate and the validation mAP, one panel above the other."""

import os

from ..model.loss_deformable_detr import MAIN_TERMS
from ..utils.file_writing import replaced_when_done

CURVES_FILE = "training.png"


def plot_training(history: list[dict], path: str) -> str:
    """Draws `history` (TrainState.history: log entries with "loss", the main terms and "lr"; evaluations with
    "eval") into the PNG `path`, put in place only once whole; -> path. A run without evaluations yet leaves the
    mAP panel empty."""
    from matplotlib.figure import Figure  # no pyplot: no window, no global backend

    logged = [h for h in history if "loss" in h]
    evaluations = [h for h in history if "eval" in h]
    figure = Figure(figsize=(7, 8))
    losses, rates, maps = figure.subplots(3, 1, sharex=True)
    for term in ("loss", *(t for t in MAIN_TERMS if t != "cardinality_error")):
        points = [(h["step"], h[term]) for h in logged if h.get(term, 0) > 0]  # a log scale has no place for 0
        if points:
            losses.plot(*zip(*points), label=term, linewidth=2 if term == "loss" else 1)
    losses.set(ylabel="training loss", yscale="log")
    if logged:
        losses.legend(loc="upper right", fontsize="small")
        rates.plot([h["step"] for h in logged], [h["lr"] for h in logged], color="tab:purple")
    rates.set(ylabel="learning rate")
    rates.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for key, label, style in (("map", "mAP@[.5:.95]", "o-"), ("map_50", "mAP@.50", "s--")):
        if evaluations:
            maps.plot([h["step"] for h in evaluations], [h["eval"][key] for h in evaluations], style, label=label)
    if evaluations:
        maps.legend(loc="lower right", fontsize="small")
    maps.set(ylim=(0, 1), xlabel="optimiser step", ylabel="validation mAP")
    for axis in (losses, rates, maps):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with replaced_when_done(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    return path


def write_training_curves(history: list[dict], output_dir: str) -> str:
    """output_dir/training.png of `history`; -> its path."""
    return plot_training(history, os.path.join(output_dir, CURVES_FILE))
