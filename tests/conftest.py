"""Shared fixtures: the real models (fetched by `make test` before pytest runs) and `tiny`."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmxd import catalog
from lmxd.synth import SHAPES, synthesize


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return catalog.models_dir()


@pytest.fixture(scope="session")
def smollm2(models_dir: Path) -> Path:
    return catalog.resolve_model("smollm2-135m", models_dir)


@pytest.fixture(scope="session")
def gemma3(models_dir: Path) -> Path:
    return catalog.resolve_model("gemma3-270m", models_dir)


@pytest.fixture(scope="session")
def tiny(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` synthetic model (a few seconds to make)."""
    dest = tmp_path_factory.mktemp("synth") / "synth-tiny.gguf"
    return synthesize(SHAPES["tiny"], dest, smollm2, log=lambda _: None)
