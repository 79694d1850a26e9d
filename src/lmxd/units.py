"""Byte quantities: parsing budget strings such as ``8GiB`` and printing sizes."""

from __future__ import annotations

import re

from lmxd.errors import BudgetParseError

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": KiB,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MiB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """Parse ``"8GiB"``, ``"512 MB"``, ``"1.5g"`` or ``"4096"`` into a positive byte count.

    Decimal units (kB, MB, GB) are powers of 1000 and binary ones (KiB, MiB, GiB) of 1024,
    as on the labels of disks and in nvidia-smi respectively.
    """
    match = _BUDGET.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise BudgetParseError(
            f"cannot read {text!r} as a size: expected a number and a unit such as 8GiB, "
            "512MiB or 2GB",
            value=text,
        )
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise BudgetParseError(f"a size must be positive, got {text!r}", value=text)
    return value


def format_bytes(n: int) -> str:
    """Binary units with two decimals: ``format_bytes(3 * MiB // 2) == "1.50 MiB"``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"
