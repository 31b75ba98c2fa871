"""Every config field as a command-line flag, and the one-line error boundary of a command.

``@config_command`` turns a function taking ``cfg: Config`` into a typer command that
also accepts ``--config FILE`` and one ``--<field-name>`` flag per setting, resolved with
:func:`lesft.config.build_config` (defaults < TOML < LESFT_* env < flags). The ``lesft``
command, the worker entry point (``lesft-worker``) and the benchmarks' commands all use
it, so it lives in the library, not in :mod:`lesft.cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import types
import typing
from typing import Callable, Optional, Sequence

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from lesft.config import Config, ConfigError, build_config, leaf_fields
from lesft.errors import path_error


_TYPE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: "BOOLEAN"}


def type_name(hint: typing.Any) -> str:
    """The help screen's name of a config field's type (``float | None`` -> ``FLOAT``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return "TEXT,..."
    return _TYPE_NAMES.get(hint, "TEXT")


def _display_type(self, ctx) -> Optional[str]:  # noqa: ARG001
    """Click's type names in every help screen (``INTEGER``, ``FLOAT``, ``TEXT``), none for a flag.

    typer 0.29 shows ``<str>``/``<int>`` and ``<bool>`` even for ``--help``; this one
    function replaces its rendering for every option of ``lesft`` and ``lesft-worker``.
    """
    if self.metavar is not None:
        return self.metavar or None
    if getattr(self, "is_flag", False):
        return None
    try:
        bare = self.bare_type()
    except (AttributeError, TypeError, AssertionError):
        return None
    name = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "bool": "BOOLEAN", "Path": "PATH"}.get(bare, bare.upper())
    return name + ("..." if getattr(self, "nargs", 1) not in (1, 0) else "")


if hasattr(typer.core, "TyperOption") and hasattr(typer.core.TyperOption, "display_type_rich"):
    typer.core.TyperOption.display_type_rich = _display_type  # type: ignore[method-assign]


def _selected(only: Sequence[str] | None) -> list[str]:
    """Leaf names of ``only`` (group names expand to their fields); every field when None."""
    leaves = leaf_fields()
    if only is None:
        return list(leaves)
    names: list[str] = []
    for item in only:
        group_fields = [] if item in leaves else [n for n, (g, _) in leaves.items() if g == item]
        if not group_fields and item not in leaves:
            raise KeyError(f"config_command(only=...): {item!r} is neither a group nor a setting")
        names += [n for n in (group_fields or [item]) if n not in names]
    return [n for n in leaves if n in names]


def _options(only: Sequence[str] | None = None) -> list[inspect.Parameter]:
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                default=typer.Option(None, "--config", help="TOML file of settings (or $LESFT_CONFIG)",
                                                     rich_help_panel="Settings", metavar="FILE"))]
    leaves = leaf_fields()
    for name in _selected(only):
        group, f = leaves[name]
        flag = "--" + name.replace("_", "-")
        # rich markup would swallow "[default: ...]" (and any bracket of the help text): escape it
        default = _default_text(f)
        help_text = escape(f.metadata.get("help", "") + (f" [default: {default}]" if default not in ("", "None") else ""))
        panel = f"Settings: {group}"
        hint = typing.get_type_hints(type(getattr(Config(), group)))[name]
        if hint is bool:
            opt = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, rich_help_panel=panel,
                               show_default=False)
            annotation = Optional[bool]
        else:
            # parsed by lesft.config (it reads "1/4", "none"), so the value stays a string here
            opt = typer.Option(None, flag, help=help_text, rich_help_panel=panel, show_default=False,
                               metavar=type_name(hint))
            annotation = Optional[str]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
    return params


def _default_text(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return ",".join(value) if isinstance(value, tuple) else str(value)


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """End a command with one clear red line (no traceback)."""
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are a user's mistake (a message for them, not a bug)."""
    # imported here: lesft.lora and lesft.models pull in torch and transformers
    from lesft.checkpoint import CheckpointError
    from lesft.data import DataError
    from lesft.lora import AdapterError
    from lesft.models import ModelError
    from lesft.runs import RunDirError

    return (ConfigError, DataError, ModelError, AdapterError, RunDirError, CheckpointError)


@contextlib.contextmanager
def one_line_errors():
    """The error boundary of a command: a user error or an OSError on a path becomes one red
    line (exit 2 or 1); anything else stays a traceback (it is a bug)."""
    try:
        yield
    except user_errors() as e:
        fail(str(e))
    except OSError as e:
        line = path_error(e)
        if line is None:
            raise
        fail(line, code=1)


def config_command(func: Callable | None = None, *, only: Sequence[str] | None = None) -> Callable:
    """Give ``func(..., cfg: Config)`` every setting as a flag (see module docstring).

    ``@config_command(only=("model", "cache_dir"))`` offers only the settings the command
    reads (group names or setting names); the others still come from --config and LESFT_*.
    """
    if func is None:
        return functools.partial(config_command, only=only)
    own = [p for p in inspect.signature(func).parameters.values() if p.name != "cfg"]
    extra = _options(only)
    names = {p.name for p in extra}

    @functools.wraps(func)
    def wrapper(**kwargs):
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        toml = settings.pop("config") or os.environ.get("LESFT_CONFIG")
        try:
            cfg = build_config(toml=toml, cli=settings)
        except ConfigError as e:
            fail(str(e))
        with one_line_errors():
            return func(cfg=cfg, **kwargs)

    wrapper.__signature__ = inspect.Signature(
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra)  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped one
    return wrapper


def guarded(func: Callable) -> Callable:
    """Turn the user errors of a plain command into one red line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with one_line_errors():
            return func(*args, **kwargs)

    return wrapper

