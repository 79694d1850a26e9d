"""The checks on `lmxd serve`'s text-valued options, as click types.

A value is checked as it is read, from the command line or from the config file alike, and
kept as it was written (``"8GiB"``, not 8589934592), so that `lmxd config` prints what the
operator wrote; the daemon's start (lmxd.cli.daemon) converts it. ``toml`` names the TOML
types an option takes in the config file: a number is taken where a number reads naturally
(``vram_cap_percent = 80``, ``devices = [0, 1]``) and turned into the option's text.
"""

from __future__ import annotations

import grp
from collections.abc import Callable
from typing import Any

import click

from lmxd.errors import InvalidInput
from lmxd.fronts.http import parse_address
from lmxd.units import parse_bytes

OFF = "off"  # --http off, --park-dir off


class Checked(click.ParamType[str, Any]):
    """Text checked by :meth:`check`, which raises ValueError or InvalidInput saying what
    was expected."""

    toml: tuple[type, ...] = (str,)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = self.text(value)
        try:
            self.check(text)
        except InvalidInput as exc:
            self.fail(exc.message, param, ctx)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return text

    def text(self, value: Any) -> str:
        return str(value)

    def check(self, text: str) -> None:
        raise NotImplementedError


class Size(Checked):
    name = "size"

    def check(self, text: str) -> None:
        parse_bytes(text)


def _percent(text: str) -> None:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number: expected a percentage such as 90") from None
    if not 0 < value <= 100:
        raise ValueError(f"{text!r}: expected a percentage in (0, 100]")


class PerDevice(Checked):
    """One value for every device (``8GiB``), or ``INDEX=VALUE`` pairs (``0=8GiB,1=16GiB``);
    whether each index is a device in use is checked at the start, once they are probed."""

    def __init__(self, name: str, value: Callable[[str], object], toml: tuple[type, ...]) -> None:
        self.name = name
        self._value = value
        self.toml = toml

    def check(self, text: str) -> None:
        if "=" not in text:
            self._value(text)
            return
        for pair in text.split(","):
            index, _, value = pair.partition("=")
            if not index.strip().isdigit() or not value:
                raise ValueError(
                    f"{text!r}: expected VALUE, or INDEX=VALUE pairs separated by commas "
                    "(0=8GiB,1=16GiB)"
                )
            self._value(value)


SIZE = Size()
PER_DEVICE_SIZE = PerDevice("size", parse_bytes, (str,))
PER_DEVICE_PERCENT = PerDevice("percent", _percent, (str, int, float))


class DeviceList(Checked):
    name = "devices"
    toml = (str, list)

    def text(self, value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    def check(self, text: str) -> None:
        if not all(part.strip().isdigit() for part in text.split(",")):
            raise ValueError(f"{text!r}: expected GPU indices such as 0,1 (or [0, 1] in a file)")


class OctalMode(Checked):
    """A mode that lets the daemon's own user read and write, and no one execute."""

    name = "mode"

    def check(self, text: str) -> None:
        try:
            mode = int(text, 8)
        except ValueError:
            raise ValueError(f"{text!r} is not an octal mode such as 0660") from None
        if mode & ~0o666 or mode & 0o600 != 0o600:
            raise ValueError(
                f"{text!r}: a socket mode gives its owner read and write (0600) and no one "
                "execute, e.g. 0600, 0660 or 0666"
            )


class Group(Checked):
    name = "group"
    toml = (str, int)

    def check(self, text: str) -> None:
        group_id(text)


def group_id(text: str) -> int:
    """A group's name or gid, as a gid."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group named {text!r}") from None


class Address(Checked):
    name = "address"

    def check(self, text: str) -> None:
        if text != OFF:
            parse_address(text)


class ParkDir(Checked):
    """A directory, or ``off``; in a config file, relative to the file (lmxd.cli.settings)."""

    name = "directory"

    def check(self, text: str) -> None:
        if not text:
            raise ValueError("expected a directory, or off")
