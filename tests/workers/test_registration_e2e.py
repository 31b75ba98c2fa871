"""--register-timeout-s is honoured by every role, and a waiting process says what it
waits for in the user's words (issue 13, item 4)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workers.launch import local_addresses

BIN = Path(sys.executable).parent
TINY = ["--model", "arch:tiny-qwen2", "--clients", "2", "--samples-per-client", "4", "--max-length", "64"]


@pytest.mark.e2e
def test_server_client_and_aggregator_give_up_after_the_register_timeout(tmp_path):
    addr = local_addresses()
    net = ["--broker-frontend", addr["broker_frontend"], "--broker-backend", addr["broker_backend"],
           "--aggregator-address", addr["aggregator_address"], "--aggregator-pub", addr["aggregator_pub"]]
    common = [*TINY, *net, "--runs-dir", str(tmp_path / "runs"), "--run-id", "alone", "--register-timeout-s", "12"]
    # no broker, no other party: each waits alone
    procs = {role: subprocess.Popen([str(BIN / "lesft-worker"), "--role", role, *common, *extra], cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for role, extra in (("server", []), ("client", ["--id", "0"]), ("aggregator", []))}
    outs = {}
    for role, p in procs.items():
        try:
            outs[role] = p.communicate(timeout=240)[0]
        finally:
            p.kill()
    for role, out in outs.items():
        assert procs[role].returncode == 1, (role, out)
        assert "(--register-timeout-s" in out and "Traceback" not in out, (role, out)
        assert "round -1" not in out and "hello" not in out.lower(), (role, out)
    assert "client(s) 0, 1 did not register within 12 s" in outs["server"]
    assert "waiting for client(s) 0, 1 (0/2 registered) for" in outs["server"]  # said while it waited
    assert "waiting for the server at" in outs["client"] and "(the registration)" in outs["client"]
    assert "did not answer the registration within 12 s" in outs["client"]
    assert "did not subscribe within 12 s" in outs["aggregator"]
