"""``lesft keys generate``: the CurveZMQ key pairs of a run and the client allow-list.

The layout is the one :mod:`workers.curve` reads; docs/security.md says who gets what.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer
from rich.table import Table

from lesft.cli.console import console
from lesft.options import fail

PARTIES = ("server", "broker", "aggregator")


def generate_keys(out: Path, clients: int) -> list[tuple[Path, str]]:
    """Write every key pair and the allow-list under ``out``; return (path, kind) written.

    Secret files get mode 0600 and the ``clients/`` folder 0700 (it holds secrets).
    """
    import zmq.auth

    written: list[tuple[Path, str]] = []
    out.mkdir(parents=True, exist_ok=True)
    client_dir, allowed = out / "clients", out / "allowed_clients"
    client_dir.mkdir(exist_ok=True)
    os.chmod(client_dir, 0o700)
    allowed.mkdir(exist_ok=True)
    for stale in allowed.glob("client-*.key"):  # the allow-list is exactly the new clients
        stale.unlink()
    for name, folder in [(p, out) for p in PARTIES] + [(f"client-{i}", client_dir) for i in range(clients)]:
        old_mask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
        try:
            public, secret = (Path(p) for p in zmq.auth.create_certificates(folder, name))
        finally:
            os.umask(old_mask)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        written += [(public, "public"), (secret, "secret")]
        if name.startswith("client-"):
            shutil.copyfile(public, allowed / public.name)
            os.chmod(allowed / public.name, 0o644)
            written.append((allowed / public.name, "allowed"))
    return written


def distribution(out: Path, clients: int) -> Table:
    table = Table("process", "copy into its own --keys-dir (and nothing else)", title=f"distributing {out}")
    table.add_row("broker", "broker.key_secret, server.key, allowed_clients/")
    table.add_row("server", "server.key_secret, broker.key")
    table.add_row("aggregator", "aggregator.key_secret, allowed_clients/")
    ids = "0" if clients == 1 else f"0..{clients - 1}"
    table.add_row(f"client i ({ids})", "clients/client-<i>.key_secret, broker.key, aggregator.key")
    return table


def generate(out: Path = typer.Option(..., "--out", help="folder to write the keys into"),
             clients: int = typer.Option(4, "--clients", help="client key pairs to make (all allowed)"),
             force: bool = typer.Option(False, "--force", help="replace keys already in --out")) -> None:
    """Make the server, broker, aggregator and client key pairs and the allow-list."""
    import zmq

    if clients < 1:
        fail(f"--clients {clients}: make at least one client key pair.")
    if not zmq.has("curve"):
        fail("this libzmq has no CURVE support: install a pyzmq wheel (it bundles libzmq with CURVE).")
    if (out / "server.key_secret").exists() and not force:
        fail(f"{out} already holds keys: pass --force to replace them (every process then needs its new files), "
             "or choose another --out.")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder.")
    try:
        written = generate_keys(out, clients)
    except OSError as e:
        fail(f"cannot write keys into {out}: {e}")
    table = Table("file", "kind", "mode", title=f"CurveZMQ keys in {out}")
    for path, kind in written:
        style = "bold red" if kind == "secret" else ""
        table.add_row(str(path.relative_to(out)), kind, oct(path.stat().st_mode & 0o777), style=style)
    console.print(table)
    console.print(distribution(out, clients))
    console.print("A secret file never leaves the process it names. Run every process with "
                  "[bold]--keys-dir DIR[/] (its own copy); one shared folder also works on one machine. Remove "
                  "[bold]allowed_clients/client-<i>.key[/] on the broker and aggregator hosts to refuse client i "
                  "at its next connection; restart them to cut it off at once.")
