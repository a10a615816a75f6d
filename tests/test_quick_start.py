"""The README's quick start, run as written: its commands, on a COCO folder of generated shapes in Roboflow's
layout, with the paper's model served by the local fake Hub (a small model in transformers' format under its id).

Only what makes it fast is added to the commands (a few training steps on small images); a change to the README's
commands changes what this test runs."""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from deformable_detr.engine.options import DEFAULT_MODEL
from tests.support.datasets_on_disk import write_coco
from tests.support.fake_hub import hub_env
from tests.support.models import serve_transformers_checkpoint
from tests.support.processes import run_command

README = Path(__file__).parent.parent / "README.md"
FAST = {
    "deformable-detr-train": ["--max_steps", "2", "--image_size", "64", "--max_image_size", "96", "--num_workers", "0"],
}


def quick_start_commands() -> list[list[str]]:
    """The commands of the first bash block under "## Quick start", comments left out."""
    section = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_quick_start_runs_as_written(tmp_path, hub):
    commands = quick_start_commands()
    assert [c[0] for c in commands] == [
        "deformable-detr-data",
        "deformable-detr-train",
        "deformable-detr-evaluate",
        "deformable-detr-detect",
    ]
    splits = {
        name: shapes_dataset(n, 64, seed=seed) for name, n, seed in (("train", 6, 1), ("valid", 3, 2), ("test", 3, 3))
    }
    write_coco(splits, CLASS_NAMES, str(tmp_path / "my-coco"))
    (tmp_path / "photos").mkdir()
    for image in sorted((tmp_path / "my-coco" / "test").glob("*.jpg"))[:2]:
        shutil.copy(image, tmp_path / "photos")
    serve_transformers_checkpoint(hub, DEFAULT_MODEL, tmp_path / "hf")
    env = hub_env(hub.endpoint, tmp_path / "home")
    bin_dir = Path(sys.executable).parent
    outputs = [
        run_command([bin_dir / command[0], *command[1:], *FAST.get(command[0], [])], env=env, cwd=tmp_path, timeout=600)
        for command in commands
    ]
    assert "train" in outputs[0].stdout and "valid" in outputs[0].stdout and "test" in outputs[0].stdout
    run = tmp_path / "runs" / "my-coco"
    for name in ("config.json", "model.safetensors", "README.md", "training.png", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "test.json").read_text()).keys() >= {"map", "map_50", "per_class"}
    assert "SenseTime/deformable-detr" in (run / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "detections").glob("*.detections.json")) == sorted(
        f"{p.name}.detections.json" for p in (tmp_path / "photos").iterdir()
    )


def test_the_readme_is_a_short_guide():
    """The README stays a guide of at most 1,500 words (code included); the rest is in docs/."""
    assert len(README.read_text().split()) <= 1500


def test_the_readmes_links_lead_to_files_here():
    """Every relative link of the README (the docs pages) names a file of the repository."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert "docs/training.md" in local
    assert [link for link in local if not (README.parent / link).is_file()] == []


def test_the_readmes_python_imports_resolve():
    """The imports of the README's Python blocks name what the package holds."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    imports = [line for block in blocks for line in block.splitlines() if line.startswith(("from ", "import "))]
    assert "from deformable_detr.engine import TrainingOptions, train" in imports
    for line in imports:
        exec(line, {})
