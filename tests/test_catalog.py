"""The catalog: names resolve, fetching verifies and is idempotent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmxd import catalog
from lmxd.errors import FetchError, UnknownModel


def test_real_models_are_fetched_and_verified(models_dir: Path) -> None:
    for entry in catalog.CATALOG.values():
        path = catalog.resolve_model(entry.name, models_dir)
        assert path.stat().st_size == entry.size
        assert catalog.sha256_file(path) == entry.sha256


def test_fetch_again_is_a_no_op(models_dir: Path) -> None:
    entry = catalog.CATALOG["smollm2-135m"]
    lines: list[str] = []
    before = (models_dir / entry.filename).stat().st_mtime_ns
    catalog.fetch(entry, models_dir, log=lines.append)
    assert "present and verified" in lines[0]
    assert (models_dir / entry.filename).stat().st_mtime_ns == before


def test_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    def write_garbage(_: catalog.CatalogEntry, scratch: Path, dest: Path) -> None:
        dest.write_bytes(b"not the model")

    entry = dataclasses.replace(catalog.CATALOG["smollm2-135m"], fetch=write_garbage)
    with pytest.raises(FetchError, match="sha256 mismatch"):
        catalog.fetch(entry, tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_models_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(catalog.MODELS_DIR_ENV, str(tmp_path))
    assert catalog.models_dir() == tmp_path
    assert catalog.models_dir(tmp_path / "x") == tmp_path / "x"


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="not fetched"):
        catalog.resolve_model("smollm2-135m", tmp_path)
    with pytest.raises(UnknownModel, match="unknown model"):
        catalog.resolve_model("gpt-5", tmp_path)
    assert catalog.resolve_model("/x/y.gguf", tmp_path) == Path("/x/y.gguf")
