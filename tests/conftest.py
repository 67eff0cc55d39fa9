"""Shared fixtures: the real-data path and one small Ray instance for the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def cifar10_subset() -> Path:
    path = SHARED_DATA / "cifar10_subset.npz"
    if not path.exists():
        pytest.skip(f"../shared/data/cifar10_subset.npz not found at {path}: "
                    "real-data tests need the shared folder beside the repository")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every integration test, started and ended here."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()
