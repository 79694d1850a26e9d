"""The config file of `lmxd serve`: where it is, reading it, and the agents it declares.

A TOML file, read with :mod:`tomllib`. Its top-level keys are the options of ``lmxd serve``
(each option's long name with its dashes turned to underscores: ``park_budget = "8GiB"``);
which keys exist and what each takes is the command's own business (lmxd.cli.settings), so
this module hands them on as TOML gave them. Its ``[[agent]]`` tables declare agents, which
the daemon registers at each start that does not find them registered already
(lmxd.service.declared); they are checked here, field by field, as a REGISTER's are.

Without ``--config``, the file is ``lmxd.toml`` in the user's config directory
(``~/.config/lmxd/lmxd.toml``), if there is one; ``--config none`` reads no file at all.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import platformdirs

from lmxd import protocol
from lmxd.errors import ConfigError

NO_FILE = "none"  # `--config none`: not even the default file
AGENT_KEY = "agent"  # the key of the [[agent]] tables


def default_path() -> Path:
    """Where the file is when ``--config`` names none."""
    return Path(platformdirs.user_config_dir("lmxd")) / "lmxd.toml"


class DeclaredAgent(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One ``[[agent]]`` table: the fields of a REGISTER, ``name`` for its ``agent``.
    A field left out takes REGISTER's default (``n_ctx``: ``lmxd serve --n-ctx``)."""

    name: protocol.AgentId
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    n_ctx: Annotated[int, msgspec.Meta(gt=0, le=protocol.INT32_MAX)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    system_prompt: str | msgspec.UnsetType = msgspec.UNSET
    sampling: protocol.Sampling | msgspec.UnsetType = msgspec.UNSET


AGENT_FIELDS = DeclaredAgent.__struct_fields__


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    options: dict[str, Any]  # every top-level key but ``agent``, as TOML gave it
    agents: tuple[DeclaredAgent, ...]


def read(path: Path) -> ConfigFile:
    """The file at ``path``, its TOML parsed and its agents checked (ConfigError if not)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}", path=str(path)
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", path=str(path)) from None
    tables = data.pop(AGENT_KEY, [])
    return ConfigFile(path, data, _agents(path, tables))


def _agents(path: Path, tables: object) -> tuple[DeclaredAgent, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(
            f"{path}: {AGENT_KEY}: expected [[agent]] tables, each with a name and a model",
            path=str(path),
        )
    agents: dict[str, DeclaredAgent] = {}
    for number, table in enumerate(tables, 1):
        name = table.get("name")
        where = f"{path}: [[agent]] #{number}" + (f" ({name})" if isinstance(name, str) else "")
        try:
            agent = msgspec.convert(table, DeclaredAgent)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{where}: {_readable(str(exc))}", path=str(path)) from None
        if agent.name in agents:
            raise ConfigError(f"{where}: agent {agent.name!r} is declared twice", path=str(path))
        agents[agent.name] = agent
    return tuple(agents.values())


def _readable(message: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.n_ctx`" as "n_ctx: expected `int`, got
    `str`"; an unknown field with the fields there are."""
    match = re.fullmatch(r"(.*) - at `\$\.(.+)`", message)
    where, what = (match.group(2), match.group(1)) if match else (None, message)
    what = what[0].lower() + what[1:]
    if what.startswith("object contains unknown field"):
        fields = protocol.Sampling.__struct_fields__ if where == "sampling" else AGENT_FIELDS
        what += f"; the fields are {', '.join(fields)}"
    return what if where is None else f"{where}: {what}"
