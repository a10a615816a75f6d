"""The commands: `deformable-detr-train`, `deformable-detr-evaluate`, `deformable-detr-detect` and
`deformable-detr-export` (also `scripts/*.py`). Each turns its arguments into the library's call and the library's
exceptions into one line and an exit status: bad options or data, files or folders that cannot be used, no network,
or a full disk, 1 (argparse's own errors 2), a training stopped by a signal 128 + its number."""

import argparse
import os
import sys
import typing
import warnings
from dataclasses import MISSING, fields
from typing import Literal

from ..engine.options import TrainingOptions, option_from_text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's lines and shows every default that says something: not None or "" (the
    help says what happens), not a flag's own True or False, not one the help already gives."""

    def _get_help_string(self, action):
        if action.default in (None, "") or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _fail(prog: str, error: Exception):
    raise SystemExit(f"{prog}: error: {error}") from None


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the commands print it: its kind and message, without the library's source line under it."""
    return f"{category.__name__}: {message}\n"


def _run(prog: str, call):
    """call(), with the library's errors about its input and the machine's (files, folders, the network, a full
    disk: OSError) printed as one line, exit status 1, and its warnings as a line each."""
    formatted = warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        call()
    except (ValueError, OSError) as error:
        _fail(prog, error)
    finally:
        warnings.formatwarning = formatted


ONNX_TOO = ", or an .onnx file written by deformable-detr-export (run in onnxruntime)"


def add_model_argument(parser: argparse.ArgumentParser, more: str = ""):
    """--model (destination model_path, the functions' parameter): a saved model folder or Hub id, and `more`."""
    parser.add_argument(
        "--model",
        dest="model_path",
        required=True,
        help=f"a saved model folder or Hub id (ours, or transformers' Deformable DETR){more}",
    )


def add_held_out_arguments(parser: argparse.ArgumentParser):
    """--validation_fraction and --seed, as the training command holds out a validation split where data has none."""
    parser.add_argument(
        "--validation_fraction",
        type=float,
        default=0.15,
        help="as in training: the share of training images held out when the data has no validation split",
    )
    parser.add_argument("--seed", type=int, default=42, help="as in training: the seed of that held-out split")


def option_type(name: str):
    """argparse's `type` of option `name`: its command-line text read as `option_from_text` reads it, a bad one
    named in argparse's usage error."""

    def convert(text: str):
        try:
            return option_from_text(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def choices(annotation) -> tuple | None:
    """The words an option takes where it takes only words: a Literal's, or those of a Literal or None."""
    members = [member for member in typing.get_args(annotation) if member is not type(None)]
    if typing.get_origin(annotation) is not Literal and len(members) == 1:
        annotation = members[0]
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def train_parser() -> argparse.ArgumentParser:
    """One flag per TrainingOptions field, in its group, with its type, default and help."""
    from ..engine import options as module

    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="deformable-detr-train", description=module.__doc__, formatter_class=HelpFormatter
    )
    groups = {}
    for f in fields(TrainingOptions):
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        if f.type is bool:
            group.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        elif f.default is MISSING:
            group.add_argument(f"--{f.name}", type=option_type(f.name), required=True, help=f.metadata["help"])
        else:
            group.add_argument(
                f"--{f.name}",
                type=option_type(f.name),
                default=f.default,
                choices=choices(f.type),
                help=f.metadata["help"],
            )
    return parser


def train_main(argv=None):
    from ..engine.signals import RESUME_HINT, TrainingStopped
    from ..engine.trainer import train

    args = train_parser().parse_args(argv)
    try:
        _run("deformable-detr-train", lambda: train(TrainingOptions(**vars(args))))
    except TrainingStopped as stopped:
        raise SystemExit(128 + stopped.signum) from None
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training began): at once, wherever the run was
        print(
            "deformable-detr-train: interrupted; a checkpoint being written then is incomplete and ignored on resume "
            f"(continue from the last complete one with {RESUME_HINT})",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="deformable-detr-evaluate",
        description="COCO mAP of a saved Deformable DETR (or an exported .onnx file) on a detection dataset (any "
        "format the training command reads). Prints the table, and with --output writes it as JSON too.",
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser, ONNX_TOO)
    parser.add_argument(
        "--dataset", required=True, help="Hub id, save_to_disk folder, COCO folder or Pascal VOC folder"
    )
    parser.add_argument("--split", default="validation", help="which split to score")
    parser.add_argument("--batch_size", type=int, default=2, help="images per batch and process")
    parser.add_argument("--num_workers", type=int, default=0, help="data loading processes")
    parser.add_argument("--output", default=None, help="where to write the metrics JSON (default: print only)")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to write the pictures: precision_recall.png (per class, IoU 0.5 and 0.5:0.95) and "
        "confusion_matrix.png (IoU 0.5, score >= 0.5), their numbers as .json beside them (default: --output's "
        "folder, none without --output)",
    )
    add_held_out_arguments(parser)
    parser.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="leave out (and list) images that cannot be read instead of refusing the dataset",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or mps (default: the GPU or MPS if there is one, else cpu); one torch cannot use here is an "
        "error; pick one of several GPUs with CUDA_VISIBLE_DEVICES",
    )
    return parser


def evaluate_main(argv=None):
    from ..metrics.evaluation import format_metrics
    from .evaluate import check_output, evaluate_saved_model, write_metrics

    args = evaluate_parser().parse_args(argv)  # its destinations are the function's parameter names

    def evaluate():
        from accelerate import PartialState

        if args.output:  # before the work; the JSON is written after the table is printed
            check_output(args.output)
        output_dir = args.output_dir or (os.path.dirname(os.path.abspath(args.output)) if args.output else None)
        metrics = evaluate_saved_model(**(vars(args) | {"output": None, "output_dir": output_dir}))
        if PartialState().is_main_process:
            print(f"{args.model_path} on {args.dataset} [{args.split}]\n{format_metrics(metrics)}")
            if args.output:
                write_metrics(metrics, args.output)
                print(f"metrics written to {args.output}")
            if output_dir:
                print(f"precision-recall curves and confusion matrix written to {output_dir}")

    _run("deformable-detr-evaluate", evaluate)


DETECT_DESCRIPTION = """Detect objects in images with a saved Deformable DETR (or an exported .onnx file). For each
image it writes a JSON of the detections (label, score, box as x0, y0, x1, y1 pixels) and a picture with the boxes
drawn, under --output_dir: a/x.jpg gives a/x.jpg.detections.json and a/x.jpg.detections.jpg. Files that are not
readable images are named and skipped; if none can be read, it fails. Ctrl-C keeps the outputs already written
(exit status 130).

Videos (.mp4, .avi, .mov, .mkv, .webm, given as files or globs; needs the [video] extra: pip install
'hub-deformable-detr[video]') are read frame by frame: v.mp4 gives v.mp4.detections.json ({"video", "width",
"height", "fps", "frames": [{"frame", "detections"}]}) and v.mp4.detections.mp4, the boxes drawn.

At the end, --output_dir/detections.json holds every image's and frame's detections in COCO's results format:
{"images": [{"id", "file_name", "width", "height", and "frame" (from 0) for a video's}], "categories": [{"id",
"name"}], "annotations": [{"image_id", "category_id", "bbox": [x, y, width, height] pixels, "score"}]}; the
annotations list is what pycocotools' loadRes takes."""


def detect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="deformable-detr-detect",
        description=DETECT_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders of images (not their subfolders), or glob patterns (quote them; a folder they "
        "match is searched as a folder is)",
    )
    add_model_argument(parser, ONNX_TOO)
    parser.add_argument(
        "--output_dir",
        default="detections",
        help="where the JSON files and pictures go: a/x.jpg gives a/x.jpg.detections.json and "
        "a/x.jpg.detections.<image_format>, a/ being its folder relative to the images' common folder; an input is "
        "never overwritten (an error if one would be)",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score of a detection, in [0, 1]")
    parser.add_argument("--top_k", type=int, default=100, help="at most this many detections per image")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--image_format", choices=["jpg", "png"], default="jpg", help="format of the drawn pictures")
    parser.add_argument(
        "--classes",
        type=lambda names: [name.strip() for name in names.split(",")],
        default=None,
        help="the class names to keep, comma-separated (default: all); a name the model lacks is an error listing its",
    )
    return parser


def detect_main(argv=None):
    from .detect import detect_files

    args = detect_parser().parse_args(argv)  # its destinations are the function's parameter names

    def detect():
        result = detect_files(**vars(args))
        skipped = f"; {len(result['skipped'])} skipped" if result["skipped"] else ""
        print(f"{len(result['written'])} image(s) written to {args.output_dir}{skipped}")

    try:
        _run("deformable-detr-detect", detect)
    except KeyboardInterrupt as interrupt:  # DetectionInterrupted, or Ctrl-C before the first image
        written = len(getattr(interrupt, "written", []))
        print(f"deformable-detr-detect: interrupted; {written} image(s) written to {args.output_dir}", file=sys.stderr)
        raise SystemExit(130) from None


EXPORT_DESCRIPTION = """Export a saved Deformable DETR (ours or transformers', a folder or a Hub id).

--format onnx (the default): one ONNX file of standard operators, with a dynamic batch, height and width, that
onnxruntime, OpenVINO and TensorRT run. The file is then run in onnxruntime and compared with PyTorch; one that fails
the check is not kept. Needs the [onnx] extra: pip install 'hub-deformable-detr[onnx]'. The file runs with
deformable-detr-detect and deformable-detr-evaluate --model file.onnx.

--format transformers: a folder in transformers' own format (config.json, model.safetensors, preprocessor_config.json)
that plain transformers loads with no remote code and no timm: DeformableDetrForObjectDetection.from_pretrained and
AutoImageProcessor.from_pretrained. Built-in ResNets become transformers' ResNet. transformers' model loaded from the
folder is compared with ours; a folder that fails the check is not kept. DC5 (dilation) models cannot be exported
this way: transformers dilates a ResNet only through timm."""


def export_parser() -> argparse.ArgumentParser:
    from . import onnx_export

    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="deformable-detr-export",
        description=EXPORT_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument(
        "--format",
        choices=["onnx", "transformers"],
        default="onnx",
        help="onnx: one .onnx file; transformers: a folder that plain transformers loads without remote code",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="the .onnx file to write, or with --format transformers the folder (new, or empty)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset, from {onnx_export.MIN_OPSET} to {onnx_export.max_opset()} (the newest this torch writes); "
        f"18 runs in onnxruntime >= 1.14, OpenVINO >= 2023.0 and TensorRT >= 8.6; --format onnx only (default: "
        f"{onnx_export.OPSET})",
    )
    parser.add_argument(
        "--no_check",
        dest="check",
        action="store_false",
        help=f"skip the check: the ONNX file run in onnxruntime, or transformers' model loaded from the folder, on "
        f"an image and on a padded batch of two, logits and boxes within {onnx_export.TOLERANCE:.0e} of PyTorch",
    )
    return parser


def export_main(argv=None):
    parser = export_parser()
    args = parser.parse_args(argv)
    if args.format == "transformers" and args.opset is not None:
        parser.error("--opset is for --format onnx: a transformers export has no opset")

    def export():
        if args.format == "transformers":
            from .transformers_export import export_transformers

            report = export_transformers(args.model_path, args.output, args.check)
            compared = "transformers' model loaded from it vs ours"
        else:
            from .onnx_export import OPSET, export_onnx

            opset = OPSET if args.opset is None else args.opset
            report = export_onnx(args.model_path, args.output, args.check, opset)
            compared = "onnxruntime vs PyTorch"
        print(f"{args.output} written in {report['seconds']} s")
        for case, difference in report["max_abs_difference"].items():
            print(f"  {compared}, {case}: max abs difference {difference:.1e}")

    _run("deformable-detr-export", export)


COMMANDS = {  # name: (what it does, an example); each runs its <name>_main of this module
    "train": ("train or fine-tune a detector", "train --dataset my-coco --output_dir runs/my-coco"),
    "evaluate": ("COCO mAP of a model on a dataset", "evaluate --model runs/my-coco --dataset my-coco --split test"),
    "detect": ("detect objects in images and videos", "detect photos/ --model runs/my-coco --output_dir detections"),
    "export": ("export to ONNX or transformers' format", "export --model runs/my-coco --output my-coco.onnx"),
    "data": ("check a dataset, or draw its boxes", "data check my-coco"),
}


def main(argv=None):
    """`python -m deformable_detr COMMAND ...` (and `python -m deformable_detr`): the commands as subcommands,
    COMMAND's arguments handed to its <name>_main (`... detect --help` is deformable-detr-detect --help)."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(
        f"  {name:<{width}}  {summary}; e.g.\n  {'':<{width}}    python -m deformable_detr {example}"
        for name, (summary, example) in COMMANDS.items()
    )
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m deformable_detr",
        description="Deformable DETR's commands, also installed as deformable-detr-COMMAND. "
        "COMMAND --help lists its options.",
        epilog=f"commands:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="COMMAND's arguments")
    args = parser.parse_args(argv)
    globals()[f"{args.command}_main"](args.arguments)


DATA_DESCRIPTION = """Look at a detection dataset (any format the training command reads: a Hub id, save_to_disk
folder, COCO, Pascal VOC or YOLO folder) before training on it, as training loads it.

  check: images and objects per split and class, a histogram of box sizes, and every problem the loader warns of
         (bad images are listed, not refused); a dataset it refuses fails with the reason.
  show:  the first --images_per_split images of each split with their boxes and class names drawn, as JPEGs
         under --output_dir/{split}/.

examples:
  deformable-detr-data check data/my-coco
  deformable-detr-data show data/my-coco --output_dir my-coco-boxes --images_per_split 8"""


def data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="deformable-detr-data", description=DATA_DESCRIPTION, formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{check,show}")
    for name, summary in (("check", "count the data and list its problems"), ("show", "draw its boxes")):
        command = commands.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        command.add_argument("dataset", help="Hub id, save_to_disk folder, COCO, Pascal VOC or YOLO folder")
        add_held_out_arguments(command)
        command.add_argument(
            "--image_size", type=int, default=800, help="as in training: images too thin for it are listed"
        )
        command.add_argument("--max_image_size", type=int, default=1333, help="as in training")
        if name == "show":
            command.add_argument("--output_dir", required=True, help="where the pictures go, a folder per split")
            command.add_argument("--images_per_split", type=int, default=4, help="images drawn per split")
    return parser


def data_main(argv=None):
    from .dataset_report import check_dataset, format_report, show_dataset

    args = vars(data_parser().parse_args(argv))
    command, source = args.pop("command"), args.pop("dataset")

    def run():
        if command == "check":
            print(format_report(check_dataset(source, **args)))
        else:
            written = show_dataset(source, **args)
            print(f"{len(written)} picture(s) written to {args['output_dir']}")

    _run("deformable-detr-data", run)


if __name__ == "__main__":  # the last lines: every command is defined above
    main()
