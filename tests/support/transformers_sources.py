"""transformers' own test mixins (tests/test_modeling_common.py, tests/test_image_processing_common.py, ...) of the
installed transformers version, taken from its source distribution on PyPI and cached.

The sdist ships tests/*.py but not the folders those files import from (tests/exporters, tests/generation,
tests/utils, the repository's utils/): `_STUBS` stands in for the few names they import, so that the mixins import.
The mixins are imported as the package `transformers_tests` (our own tests are the package `tests`).
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"
CACHE = Path(os.environ.get("HUB_DEFORMABLE_DETR_CACHE", Path.home() / ".cache" / "hub-deformable-detr"))

# path under the cached root -> its text
_STUBS = {
    # ModelTesterMixin derives from it; its export tests (tests/exporters/test_export.py) are not in the sdist
    f"{PACKAGE}/exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # ModelTesterMixin only checks whether a test class derives from it; Deformable DETR does not generate
    f"{PACKAGE}/generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # ConfigTester sets these on a config and reads them back: the common PretrainedConfig fields, each with a
    # value other than its default
    f"{PACKAGE}/utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
    # the image mixin's few tests on Hub images (ADE20k, COCO) go through it
    "utils/fetch_hub_objects_for_ci.py": (
        "def url_to_local_path(url, *args, **kwargs):\n"
        '    raise OSError(f"a Hub image is needed and the tests run offline: {url}")\n'
    ),
}


class SourcesUnavailable(RuntimeError):
    """transformers' test sources could not be had (no sdist download, no test files in it)."""


def tests_root(version: str = transformers.__version__) -> Path:
    """The cached folder holding the package `transformers_tests` of transformers `version`; made on first use.

    `TRANSFORMERS_SDIST` may name a local transformers-<version>.tar.gz to use instead of downloading it.
    """
    root = CACHE / f"transformers-{version}-tests"
    if (root / PACKAGE / "test_modeling_common.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        local = os.environ.get("TRANSFORMERS_SDIST")
        sdist = Path(local) if local else _download(version, tmp)
        staging = Path(tmp) / "root"
        _extract_tests(sdist, staging / PACKAGE)
        for path, text in _STUBS.items():
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            (staging / path).write_text(text)
        for folder in ("exporters", "generation", "utils"):
            (staging / PACKAGE / folder / "__init__.py").touch()
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(root)
        except OSError:  # another process made it first, or another file system: copy unless it is there
            if not (root / PACKAGE / "test_modeling_common.py").is_file():
                shutil.copytree(staging, root, dirs_exist_ok=True)
    return root


def _download(version: str, folder: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    command += ["--dest", folder, f"transformers=={version}"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = getattr(error, "stderr", "") or ""
        raise SourcesUnavailable(f"pip download of transformers=={version}'s sdist failed: {detail[-300:]}") from error
    found = sorted(Path(folder).glob("transformers-*.tar.gz"))
    if not found:
        raise SourcesUnavailable(f"pip download of transformers=={version} gave no .tar.gz")
    return found[0]


def _extract_tests(sdist: Path, destination: Path):
    """tests/*.py of the sdist (the top level: the common mixins) into `destination`, a package."""
    destination.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and _is_top_level_test_file(m.name)]
        if not any(Path(m.name).name == "test_modeling_common.py" for m in members):
            raise SourcesUnavailable(f"{sdist.name} has no tests/test_modeling_common.py")
        for member in members:
            with archive.extractfile(member) as source:
                (destination / Path(member.name).name).write_bytes(source.read())
    (destination / "__init__.py").touch()


def _is_top_level_test_file(name: str) -> bool:
    parts = Path(name).parts  # transformers-<version>/tests/<file>.py
    return len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py")


def import_mixin_module(name: str):
    """`transformers_tests.<name>` (e.g. "test_modeling_common") of the installed transformers."""
    root = str(tests_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.{name}")
