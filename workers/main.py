"""``lesft-worker --role broker|server|aggregator|client [--id N]``: one process of the system.

Every setting is a flag (or a ``LESFT_*`` env var, or a key of ``--config FILE``), so
the same command runs on one laptop or across machines by changing the addresses.
"""

from __future__ import annotations

import os
import sys

import typer
import zmq

from lesft.config import Config
from lesft.errors import path_error
from lesft.options import config_command, fail

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Several workers often share one machine: OpenMP threads that spin after each parallel
# region would steal the cores of the other processes (set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
ROLES = ("broker", "server", "aggregator", "client")


@app.command()
@config_command
def worker(role: str = typer.Option(..., "--role", help="broker | server | aggregator | client"),
           worker_id: int = typer.Option(0, "--id", help="client id, 0..clients-1"),
           resume: bool = typer.Option(False, "--resume", help="server: continue from the last checkpoint; "
                                                               "every role: accept a finished run's folder"),
           overwrite: bool = typer.Option(False, "--overwrite", help="delete a finished run in the run folder first"),
           *, cfg: Config) -> None:
    """Run one role of a LESFT system."""
    from lesft.runs import RunDirError
    from lesft.wire import WireError
    from workers import security
    from workers.process import run_dir_for
    from workers.transport import WorkerError

    if role not in ROLES:
        fail(f"--role {role!r} is not a role: use one of {', '.join(ROLES)}.")
    if resume and overwrite:
        fail("--resume and --overwrite contradict each other: pick one.")
    try:
        run_dir_for(cfg, "resume" if resume else "join-overwrite" if overwrite else "join")
    except RunDirError as e:
        fail(f"{role}: {e}")
    except OSError as e:
        fail(f"{role}: cannot create the run folder in --runs-dir {cfg.run.runs_dir}: {path_error(e) or e}", code=1)
    try:
        if role == "broker":
            from broker.proxy import Broker

            code = Broker(cfg).run()
        elif role == "server":
            from lesft.methods import get_method
            from workers.centralized import CentralizedServer
            from workers.server import Server

            server = CentralizedServer(cfg) if get_method(cfg.train.method).centralized else Server(cfg, resume=resume)
            code = server.run()
        elif role == "aggregator":
            from workers.aggregator import Aggregator

            code = Aggregator(cfg).run()
        else:
            from workers.client import Client

            code = Client(cfg, worker_id).run()
    except (WorkerError, WireError) as e:
        fail(f"{role}: {security.refusal() or e}", code=1)
    except OSError as e:
        fail(f"{role}: {path_error(e) or e}", code=1)
    except zmq.ZMQError as e:  # e.g. an address already in use
        fail(f"{role}: {e} (check the --broker-*/--aggregator-* addresses)", code=1)
    if security.refusal():  # a peer refused our CurveZMQ key: the loop stopped, but this is a failure
        fail(f"{role}: {security.refusal()}", code=1)
    raise typer.Exit(code)


def main() -> None:
    from workers.process import die_with_parent

    die_with_parent()
    app(prog_name="lesft-worker")


if __name__ == "__main__":
    sys.exit(main())
