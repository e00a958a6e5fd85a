"""Shared fixtures: the real slides in ../shared (skipped when absent) and the repo root."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SLIDES = REPO.parent / "shared" / "data" / "slides"


def shared_slide(rel: str) -> Path:
    path = SHARED_SLIDES / rel
    if not path.exists():
        pytest.skip(f"{path} not present (the shared test slides live beside the repo in ../shared)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): its
    tensors are tiny, the machine has two cores and may be shared; restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cmu_small() -> Path:
    return shared_slide("real/aperio/CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """A small completed workflow run (tests/smallrun.py), built once; copy it, never change it."""
    from smallrun import build_small_run

    return build_small_run(tmp_path_factory.mktemp("small_run"))
