from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmxd.errors import BudgetParseError
from lmxd.units import GiB, MiB, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("8 GiB", 8 * GiB),
        ("512MiB", 512 * MiB),
        ("2GB", 2_000_000_000),
        ("1.5g", 1_500_000_000),
        ("4096", 4096),
        ("  64 kib ", 64 * 1024),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "eight", "8XB", "-1GiB", "0", "GiB", "8 Gi B", "1e9"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(BudgetParseError) as exc:
        parse_bytes(text)
    assert exc.value.code == "BAD_BUDGET"
    assert exc.value.details["value"] == text


@given(st.integers(min_value=1, max_value=2**50))
def test_binary_units_round_trip(n: int) -> None:
    assert parse_bytes(f"{n}B") == n
    text, unit = format_bytes(n).split()
    assert abs(parse_bytes(f"{text}{unit}") - n) <= n * 0.005 + 1
