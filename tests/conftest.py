"""Fixtures that several test files use: generated shapes data written to disk, and the local fake Hub; and the
data cache (data/cache.py) in a folder of the session's own, not the user's ~/.cache."""

import os

import pytest

from deformable_detr.data.cache import CACHE_VARIABLE
from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from tests.support.datasets_on_disk import write_coco
from tests.support.fake_hub import FakeHub


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """The session's data cache folder; the processes that tests start inherit it."""
    folder = str(tmp_path_factory.mktemp("data_cache"))
    saved = os.environ.get(CACHE_VARIABLE)
    os.environ[CACHE_VARIABLE] = folder
    yield folder
    if saved is None:
        del os.environ[CACHE_VARIABLE]
    else:
        os.environ[CACHE_VARIABLE] = saved


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory):
    """`shapes_coco(train, valid)` writes a fresh COCO folder (Roboflow layout) of generated 64x64 shapes images,
    `train` of them (seed 1) in train/ and `valid` (seed 2) in valid/, and returns its path."""

    def write(train: int, valid: int) -> str:
        splits = {"train": shapes_dataset(train, 64, seed=1), "valid": shapes_dataset(valid, 64, seed=2)}
        return write_coco(splits, CLASS_NAMES, str(tmp_path_factory.mktemp("shapes")))

    return write


@pytest.fixture(scope="module")
def shapes_folder(shapes_coco):
    """A COCO folder of 6 training and 4 validation shapes images, for the tests that train."""
    return shapes_coco(6, 4)


@pytest.fixture
def hub():
    """The local fake Hub (tests/support/fake_hub.py), serving during one test."""
    with FakeHub() as hub:
        yield hub
