"""Shared pytest fixtures.

Real image data is optional. It is found through ``VLPROMPT_DATA`` (default
``~/.cache/vlprompt-data`` when that folder exists); tests that need it are skipped with a reason
when it is absent, so a bare checkout still passes, except with ``VLPROMPT_REQUIRE_DATA=1`` (set by
scripts/test.sh where the shared data must be there), where they fail instead.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------------------------
# The tiny model and a small generated dataset, once per test module (a module may define its own)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bb():
    """The tiny randomly initialised CLIP (support.tiny_backbone)."""
    from support import tiny_backbone

    return tiny_backbone()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A generated dataset of 8 classes, 2 training and 2 test images each."""
    from vlprompt.data import make_synthetic_dataset

    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=2, n_test_per_class=2,
                                  seed=0)


# ----------------------------------------------------------------------------------------------
# Real data (see /work/shared/data/README.md for what each folder holds)
# ----------------------------------------------------------------------------------------------


def real_data_root() -> Path | None:
    """The real-data folder, or None when it is not available."""
    env = os.environ.get("VLPROMPT_DATA")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "vlprompt-data"
    return root if root.is_dir() else None


def _missing_data(msg: str) -> None:
    """Skip, or fail where the data is required (VLPROMPT_REQUIRE_DATA=1, set by scripts/test.sh when
    ../shared/data exists or in CI): there a missing folder is a broken set-up, not an optional extra."""
    if os.environ.get("VLPROMPT_REQUIRE_DATA") == "1":
        pytest.fail(f"{msg} [VLPROMPT_REQUIRE_DATA=1: the real data is required here]", pytrace=False)
    pytest.skip(msg)


def _real_subdir(*parts: str) -> Path:
    root = real_data_root()
    if root is None:
        where = os.environ.get("VLPROMPT_DATA") or "~/.cache/vlprompt-data"
        _missing_data(f"real data not found at {where}: set VLPROMPT_DATA to the unpacked data folder")
    path = root.joinpath(*parts)
    if not path.exists():
        _missing_data(f"real data not found: {path} (unpack it under VLPROMPT_DATA)")
    return path


@pytest.fixture(scope="session")
def coop_splits_dir() -> Path:
    """Folder with CoOp's split_zhou_*.json files (images not included)."""
    return _real_subdir("coop-splits")


@pytest.fixture(scope="session")
def caltech_root() -> Path:
    """Data root holding caltech-101/ with its images and split file."""
    _real_subdir("caltech-101", "101_ObjectCategories")
    return _real_subdir("caltech-101", "split_zhou_Caltech101.json").parent.parent


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """CIFAR-10 as train/<class>/*.jpg and test/<class>/*.jpg."""
    return _real_subdir("cifar10")


# ----------------------------------------------------------------------------------------------
# Hygiene
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def keep_global_random():
    """Restore Python's global ``random`` state after a test that seeds it."""
    state = random.getstate()
    yield
    random.setstate(state)


REAL_DATA_FIXTURES = {"coop_splits_dir", "caltech_root", "cifar10_dir"}


def pytest_collection_modifyitems(config, items):
    """Tag tests that use the real-data fixtures with the ``realdata`` marker (``-m "not realdata"``)."""
    for item in items:
        if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(autouse=True, scope="session")
def _isolated_feature_cache(tmp_path_factory):
    """Tests never read or write the user's feature cache."""
    old = os.environ.get("VLPROMPT_CACHE")
    os.environ["VLPROMPT_CACHE"] = str(tmp_path_factory.mktemp("vlprompt-cache"))
    yield
    if old is None:
        os.environ.pop("VLPROMPT_CACHE", None)
    else:
        os.environ["VLPROMPT_CACHE"] = old
