"""Runs transformers' object-detection example scripts, unmodified, on a tiny model of ours, offline.

    python scripts/run_transformers_examples.py --examples DIR [--work DIR] [--scripts trainer no_trainer]

DIR holds run_object_detection.py (Trainer) and/or run_object_detection_no_trainer.py (Accelerate), from
transformers' examples/pytorch/object-detection (not on PyPI: take them from a transformers checkout of the
installed version). They need albumentations and torchmetrics. The script writes a small multi-class dataset of our
synthetic shapes in the cppe-5 schema (parquet, read by `load_dataset(folder)`) and a tiny saved model of ours, runs
each example (a few training steps, torchmetrics mAP, saving) with --trust_remote_code, then reloads each output
with trust_remote_code in a Python where our package cannot be imported, and checks its detections. Exits non-zero
when one fails; prints each run's last output lines.

Examples of transformers 4.x import `transformers.utils.send_example_telemetry`, which transformers 5 no longer has:
where it is missing, the runs get a no-op in its place (a sitecustomize module on their PYTHONPATH), and say so.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = {"trainer": "run_object_detection.py", "no_trainer": "run_object_detection_no_trainer.py"}

# Hides our package from the reloading process, so that only the files saved beside the weights can serve
RELOAD = """
import sys
sys.modules["deformable_detr"] = None
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection

folder, image_path = sys.argv[1], sys.argv[2]
model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.open(image_path)
with torch.no_grad():
    outputs = model(**processor(images=image, return_tensors="pt"))
result = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[image.size[::-1]])[0]
print(type(model).__module__, type(model).__name__, type(processor).__name__, len(result["scores"]))
"""


def write_dataset(folder: Path, sizes=(("train", 24), ("validation", 8), ("test", 8))) -> Path:
    """Our synthetic shapes (3 classes) in the cppe-5 schema, one parquet file per split; returns `folder`."""
    from deformable_detr.data.schema import records_to_dataset
    from deformable_detr.data.shapes import CLASS_NAMES, shapes_records

    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, count) in enumerate(sizes):
        dataset = records_to_dataset(shapes_records(count, image_size=96, seed=seed), CLASS_NAMES)
        dataset.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def write_model(folder: Path) -> Path:
    """A tiny model of ours (random weights) and its processor, saved as for the Hub; returns `folder`."""
    from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor
    from deformable_detr.data.shapes import CLASS_NAMES

    config = DeformableDetrConfig(
        backbone="resnet18",
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        id2label=dict(enumerate(CLASS_NAMES)),
    )
    DeformableDetrForObjectDetection(config).save_pretrained(folder)
    DeformableDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 128}).save_pretrained(folder)
    return folder


def example_command(kind: str, script: Path, model: Path, data: Path, output: Path) -> list[str]:
    common = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output)]
    common += ["--trust_remote_code", "--image_square_size", "128", "--seed", "0"]
    common += ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"]
    if kind == "trainer":
        extra = ["--do_train", "--do_eval", "--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "3"]
        extra += ["--save_strategy", "steps", "--save_steps", "3", "--load_best_model_at_end", "--use_cpu"]
        extra += ["--metric_for_best_model", "eval_map", "--greater_is_better", "True", "--report_to", "none"]
        extra += ["--dataloader_num_workers", "0", "--logging_steps", "1", "--eval_do_concat_batches", "False"]
    else:
        extra = ["--max_train_steps", "6", "--num_train_epochs", "1", "--dataloader_num_workers", "0"]
    return [sys.executable, str(script), *common, *extra]


TELEMETRY_SHIM = """import transformers.utils

if not hasattr(transformers.utils, "send_example_telemetry"):
    transformers.utils.send_example_telemetry = lambda *args, **kwargs: None
"""


def shim_path(work: Path) -> str | None:
    """A folder with the telemetry no-op as sitecustomize, where transformers lacks the function; else None."""
    import transformers.utils

    if hasattr(transformers.utils, "send_example_telemetry"):
        return None
    folder = work / "shim"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(TELEMETRY_SHIM)
    print(f"transformers {transformers.__version__} has no send_example_telemetry: the examples get a no-op")
    return str(folder)


def run(command: list[str], log: Path, cwd: Path, pythonpath: str | None = None) -> bool:
    """Runs `command` offline with its output in `log`; prints the last lines; whether it exited 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    lines = log.read_text().splitlines()
    print(f"$ {' '.join(command)}\n  exit {code}; last lines of {log}:")
    print("\n".join("  | " + line[:300] for line in lines[-15:]))
    return code == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=Path, required=True, help="folder with transformers' example scripts")
    parser.add_argument("--work", type=Path, help="where to write the data, model and outputs (default: a temp dir)")
    parser.add_argument("--scripts", nargs="+", choices=sorted(SCRIPTS), default=sorted(SCRIPTS))
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="transformers-examples-"))
    data, model = write_dataset(work / "shapes"), write_model(work / "tiny-model")
    image = work / "image.png"
    from deformable_detr.data.shapes import shapes_records

    shapes_records(1, image_size=96, seed=9)[0]["image"].save(image)
    shim, ok = shim_path(work), True
    for kind in args.scripts:
        script, output = args.examples / SCRIPTS[kind], work / f"output-{kind}"
        if not script.is_file():
            print(f"{script}: not there, skipped")
            continue
        if not run(example_command(kind, script.resolve(), model, data, output), work / f"{kind}.log", work, shim):
            ok = False
            continue
        for name in ("all_results.json", "test_results.json"):
            if (output / name).is_file():
                print(f"  {name}: {json.dumps(json.loads((output / name).read_text()))[:600]}")
        reload = [sys.executable, "-c", RELOAD, str(output), str(image)]
        ok = run(reload, work / f"{kind}-reload.log", work) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
