"""The packages of the dev extra, which `make test` installs, all import: the tests that need one skip without it
(so that the suite runs where one has no wheel), and a broken install would otherwise pass as skips."""

import importlib
import re
from importlib.metadata import requires

IMPORT_NAMES = {  # where the module is not the distribution's name
    "faster-coco-eval": "faster_coco_eval",
    "import-linter": "importlinter",
    "mkdocs-material": "material",
}


def test_every_package_of_the_dev_extra_imports():
    dev = [r for r in requires("hub-deformable-detr") if re.search(r"""extra\s*==\s*["']dev["']""", r)]
    names = [re.split(r"[<>=!~\[ ;]", requirement)[0] for requirement in dev]
    assert "triton" in names and "onnxruntime" in names, names
    missing = []
    for name in names:
        try:
            importlib.import_module(IMPORT_NAMES.get(name, name))
        except Exception as error:  # noqa: BLE001 -- missing or broken: either way the tests would skip
            missing.append(f"{name} ({type(error).__name__}: {error})")
    assert not missing, f"the dev extra is not fully installed (pip install -e '.[dev]'): {missing}"
