"""`lmxd serve`'s effective settings: each option's value, from the command line, the config
file or its default, and where it came from (what `lmxd config` prints).

The command line wins, then the environment ($LMXD_API_KEY for ``api_key``), then the file,
then the default. A value from the file is checked against the TOML types its option takes
(a number where a number goes), then by the option's own click type, as a command-line value
is; a path (``socket``, ``models_dir``, ``allow_dir``, ``park_dir``) has ``~`` expanded and
is relative to the file's directory. A fault is a ConfigError that names the file, the key
and what was expected. A repeatable option given on the command line replaces the file's list.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import click
import msgspec
import platformdirs
from click.core import ParameterSource

from lmxd import catalog, protocol
from lmxd.cli import checks
from lmxd.config import AGENT_KEY, NO_FILE, ConfigFile, DeclaredAgent, default_path, read
from lmxd.errors import ConfigError

DEFAULT = "default"
COMMAND_LINE = "command line"

_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "a table",
    datetime: "a date-time",
    date: "a date",
    time: "a time",
}

# What a key left unset means, for `lmxd config`.
UNSET_MEANS = {
    "socket_group": "the daemon user's own group",
    "devices": "every GPU",
    "vram_cap_percent": "90 on every device",
    "vram_limit": "each device's own size",
    "host_limit": "the host memory available at the start",
    "api_key": "no key: HTTP on loopback only",
}


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # DEFAULT, COMMAND_LINE, "environment $NAME" or "file PATH"


@dataclass(frozen=True)
class Settings:
    file: Path | None  # the config file read, if any
    why: str  # how that file was chosen, or why there is none
    values: dict[str, Setting]  # by key, in the order of `lmxd serve --help`
    agents: tuple[DeclaredAgent, ...]  # the file's [[agent]] tables

    def __getitem__(self, key: str) -> Any:
        return self.values[key].value


def resolve(ctx: click.Context) -> Settings:
    """The settings of a command decorated with lmxd.cli.options.serve_options."""
    path, why = _config_path(ctx.params["config"])
    file = read(path) if path is not None else None
    params = {p.name: p for p in ctx.command.params if p.name not in (None, "config", "help")}
    from_file = _from_file(ctx, params, file) if file is not None else {}
    values = {}
    for key, param in params.items():
        source = ctx.get_parameter_source(key)
        if source is ParameterSource.COMMANDLINE:
            values[key] = Setting(ctx.params[key], COMMAND_LINE)
        elif source is ParameterSource.ENVIRONMENT:
            values[key] = Setting(ctx.params[key], f"environment ${param.envvar}")
        elif key in from_file:
            values[key] = Setting(from_file[key], f"file {path}")
        else:
            values[key] = _default(key, ctx.params[key])
    return Settings(path, why, values, file.agents if file is not None else ())


def _config_path(given: str | None) -> tuple[Path | None, str]:
    if given == NO_FILE:
        return None, f"none (--config {NO_FILE})"
    if given is not None:
        return Path(given).expanduser().absolute(), "--config"
    path = default_path()
    if path.is_file():
        return path, "the default location"
    return None, f"none ({path} does not exist)"


def _default(key: str, value: Any) -> Setting:
    """A default, with what the machine makes of the three that depend on it."""
    if value is not None:
        return Setting(value, DEFAULT)
    env = {"socket": protocol.SOCKET_ENV, "models_dir": catalog.MODELS_DIR_ENV}.get(key)
    if env is not None and os.environ.get(env):
        return Setting(Path(os.environ[env]), f"environment ${env}")
    if key == "socket":
        return Setting(protocol.default_socket_path(), DEFAULT)
    if key == "models_dir":
        return Setting(catalog.models_dir(), DEFAULT)
    if key == "park_dir":
        return Setting(platformdirs.user_state_dir("lmxd"), DEFAULT)
    return Setting(None, DEFAULT)


def _from_file(
    ctx: click.Context, params: Mapping[str, click.Parameter], file: ConfigFile
) -> dict[str, Any]:
    out = {}
    for key, raw in file.options.items():
        param = params.get(key)
        if param is None:
            close = difflib.get_close_matches(key, [*params, AGENT_KEY], n=1)
            raise ConfigError(
                f"{file.path}: unknown key {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + ": the keys are `lmxd serve`'s long options with dashes turned to "
                "underscores, and [[agent]] tables",
                path=str(file.path),
                key=key,
            )
        expected = _toml_types(param)
        if not _is(raw, expected) or (param.multiple and not all(_is(v, (str,)) for v in raw)):
            wanted = "a list of strings" if param.multiple else " or ".join(map(_name, expected))
            raise ConfigError(
                f"{file.path}: {key}: expected {wanted}, got {_name(type(raw))} ({_toml(raw)})",
                path=str(file.path),
                key=key,
            )
        try:
            out[key] = param.type_cast_value(ctx, _relative(param, raw, file.path.parent))
        except click.BadParameter as exc:
            raise ConfigError(
                f"{file.path}: {key}: {exc.message}", path=str(file.path), key=key
            ) from None
    return out


def _toml_types(param: click.Parameter) -> tuple[type, ...]:
    """The TOML types a key takes."""
    if param.multiple:
        return (list,)
    if isinstance(param, click.Option) and param.is_flag:
        return (bool,)
    if isinstance(param.type, click.types.IntParamType):
        return (int,)
    if isinstance(param.type, click.types.FloatParamType):
        return (int, float)
    if isinstance(param.type, checks.Checked):
        return param.type.toml
    return (str,)


def _is(value: object, types: tuple[type, ...]) -> bool:
    # TOML's true is no integer, though Python's bool is an int.
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _name(kind: type) -> str:
    return _NAMES.get(kind, kind.__name__)


def _relative(param: click.Parameter, value: Any, base: Path) -> Any:
    """A path of the file: ``~`` expanded, relative to the file's directory."""
    if not isinstance(param.type, click.Path | checks.ParkDir):
        return value
    if isinstance(value, list):
        return [_relative(param, v, base) for v in value]
    if value == checks.OFF and isinstance(param.type, checks.ParkDir):
        return value
    return str(base / Path(value).expanduser())


def show(settings: Settings) -> str:
    """The settings as a TOML file, each value's source in a comment after it; a key not
    set is a comment saying what that means, and an API key is never shown."""
    lines = [
        "# lmxd serve's configuration: each key, its value, and where the value comes from",
        f"# config file: {settings.file} ({settings.why})"
        if settings.file is not None
        else f"# config file: {settings.why}",
    ]
    for key, setting in settings.values.items():
        if key == "api_key" and setting.value is not None:
            lines.append(f"# {key} = (set, not shown)  # {setting.source}")
        elif setting.value is None:
            lines.append(f"# {key}: not set, {UNSET_MEANS[key]}  # {setting.source}")
        else:
            lines.append(f"{key} = {_toml(setting.value)}  # {setting.source}")
    for agent in settings.agents:
        lines += ["", f"[[{AGENT_KEY}]]  # file {settings.file}"]
        lines += [f"{k} = {_toml(v)}" for k, v in msgspec.to_builtins(agent).items()]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    """``value`` as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
