"""Every config field as a command-line flag, generated from the dataclass tree.

``@config_command`` turns a function taking ``cfg: Config`` into a typer command that
also accepts ``--config FILE`` and one ``--<field-name>`` flag per setting, resolved with
:func:`lesft.config.build_config` (defaults < TOML < LESFT_* env < flags).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from typing import Callable, Optional

import typer

from lesft.config import Config, ConfigError, build_config, leaf_fields


def _options() -> list[inspect.Parameter]:
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                default=typer.Option(None, "--config", help="TOML file of settings (or $LESFT_CONFIG)",
                                                     rich_help_panel="Settings"))]
    for name, (group, f) in leaf_fields().items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [default: {_default_text(f)}]"
        panel = f"Settings: {group}"
        hint = typing.get_type_hints(type(getattr(Config(), group)))[name]
        if hint is bool:
            opt = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, rich_help_panel=panel,
                               show_default=False)
            annotation = Optional[bool]
        else:
            opt = typer.Option(None, flag, help=help_text, rich_help_panel=panel, show_default=False)
            annotation = Optional[str]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
    return params


def _default_text(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return ",".join(value) if isinstance(value, tuple) else str(value)


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """End a command with one clear red line (no traceback)."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    from lesft.data import DataError
    from lesft.lora import AdapterError
    from lesft.models import ModelError

    return (ConfigError, DataError, ModelError, AdapterError)


def config_command(func: Callable) -> Callable:
    """Give ``func(..., cfg: Config)`` every setting as a flag (see module docstring)."""
    own = [p for p in inspect.signature(func).parameters.values() if p.name != "cfg"]
    extra = _options()
    names = {p.name for p in extra}

    @functools.wraps(func)
    def wrapper(**kwargs):
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        toml = settings.pop("config") or os.environ.get("LESFT_CONFIG")
        try:
            cfg = build_config(toml=toml, cli=settings)
        except ConfigError as e:
            fail(str(e))
        try:
            return func(cfg=cfg, **kwargs)
        except user_errors() as e:
            fail(str(e))

    wrapper.__signature__ = inspect.Signature(
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra)  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped one
    return wrapper


def guarded(func: Callable) -> Callable:
    """Turn the user errors of a plain command into one red line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except user_errors() as e:
            fail(str(e))

    return wrapper

