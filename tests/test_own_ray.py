"""A local run starts a Ray of its own: it never joins one that merely runs on the machine.

`ray.init()` without an address joins the cluster named in /tmp/ray/ray_current_cluster,
which may be another user's. Here a real foreign head is started the way another user would
(`ray start --head`, default temp dir), then `batch-infer run` runs beside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_records

CURRENT = Path("/tmp/ray/ray_current_cluster")  # what a bare ray.init() would join


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _run_in(address: str, code: str) -> str:
    """Run `code` in a driver joined to `address`; its last printed line."""
    out = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={address!r}); {code}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def foreign_head() -> Iterator[str]:
    """Another user's Ray head: default temp dir, so it becomes /tmp/ray's current cluster."""
    if CURRENT.exists():
        pytest.skip(f"{CURRENT} exists: a Ray is already running here; not touching it")
    port = _free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not (CURRENT.exists() and CURRENT.read_text().strip() == address):
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the foreign head did not come up"
            time.sleep(0.5)
        yield address
    finally:  # our own throwaway head: no need to wait for a polite stop
        for pid in _session_pids(head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        head.wait(timeout=30)
        if CURRENT.exists() and CURRENT.read_text().strip() == address:
            CURRENT.unlink()


def test_local_run_starts_its_own_ray_beside_a_foreign_one(foreign_head, tmp_path):
    foreign_node = _run_in(foreign_head, "print(ray.get_runtime_context().get_node_id())")
    doc = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    doc["input"]["path"] = str(ROOT / "data" / "digits")
    doc["model"]["onnx"] = str(ROOT / "models" / "digits.onnx")
    doc["output"]["path"] = str(tmp_path / "out")
    doc["num_actors"] = 2  # Ray's actors, not only the run's own process: Ray must start
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", "run", str(spec), "-q"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (record,) = run_records(tmp_path / "out")
    assert record["status"] == "succeeded" and record["rows"] == 1797
    assert record["nodes"] and foreign_node not in record["nodes"]  # its own Ray's node


LISTENERS = """
import os, subprocess, sys
from batch_infer.job import connect
connect()
ours = {line.split()[0] for line in subprocess.run(["ps", "-e", "-o", "pid=,sid="],
        capture_output=True, text=True).stdout.splitlines()
        if line.split()[1] == str(os.getsid(0))}
listen = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
mine = [l.split()[3] for l in listen.splitlines() if any(f"pid={p}," in l for p in ours)]
print(" ".join(mine))
sys.stdout.flush()
os._exit(0)
"""


def test_a_local_ray_of_the_runs_own_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    done = subprocess.run(
        [sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=180,
        env={**env, "HOME": str(tmp_path)}, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    addresses = done.stdout.split()
    assert addresses, "no listening socket of the run's own Ray was found"
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in addresses), (
        addresses
    )
    assert "Token authentication is enabled" not in done.stderr  # on purpose: no warning
    assert (tmp_path / ".ray" / "auth_token").exists()


def test_a_half_imported_ray_is_not_joined(monkeypatch):
    """A run (or a backfill's next date) may ask whether Ray is up while the Ray-start thread
    of an earlier run in this process is still importing it: a half-imported `ray` module has
    no attributes yet, and means "not joined", so this run starts a Ray of its own."""
    import types

    from batch_infer.backends import ray_initialized
    from batch_infer.job import starts_local_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    assert not ray_initialized()
    assert starts_local_ray(None)
    assert not starts_local_ray("127.0.0.1:6379")
