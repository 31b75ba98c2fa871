"""``lesft bench ...``: every benchmark of ``bench/``, each defined by its own module.

A benchmark module defines its command with :func:`bench.common.bench_command`; this
module finds them all and registers them on one typer group whose help names them.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

import bench
from bench.common import BenchCommand


def bench_commands() -> list[BenchCommand]:
    """The :class:`BenchCommand` of every module of ``bench/``, in their help order."""
    found: dict[str, BenchCommand] = {}
    for info in pkgutil.iter_modules(bench.__path__):
        module = importlib.import_module(f"bench.{info.name}")
        for command in (v for v in vars(module).values() if isinstance(v, BenchCommand)):
            if command.name in found and found[command.name] is not command:
                raise RuntimeError(f"two benchmarks are named {command.name!r} (one in bench.{info.name})")
            found[command.name] = command
    return sorted(found.values(), key=lambda c: c.order)


def _help(commands: list[BenchCommand]) -> str:
    def names(kind: str) -> str:
        return ", ".join(c.name for c in commands if c.kind == kind)

    return f"The paper's tables and figures on real runs ({names('paper')}) and micro-benchmarks ({names('micro')})."


def build_bench_app() -> typer.Typer:
    commands = bench_commands()
    group = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help=_help(commands))
    for command in commands:
        group.command(command.name)(command.callback)
    return group


bench_app = build_bench_app()
