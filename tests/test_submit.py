"""`batch-infer submit` / `batch-infer jobs` against a real Ray head that requires a token.

The head is started with `ray start --head` (loopback only, its own --temp-dir and free ports,
RAY_AUTH_MODE=token with a token generated here) and stopped at the end by the ids of the
processes it started: `ray stop` would stop every Ray on the machine, other people's included.
The CLI runs in subprocesses, as a user runs it; no mocks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from onnx import TensorProto, helper, numpy_helper

from batch_infer.errors import EXIT_CLUSTER, EXIT_USER_ERROR, SpecError
from batch_infer.ops.submit import CARRY_LIMIT, MODEL_ORIGIN_ENV, Submission, model_files
from batch_infer.spec import resolve_spec
from tests.conftest import ROOT, read_output, run_records

pytestmark = pytest.mark.slow

CLI_TIMEOUT = 240


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    address: str
    token: str
    home: Path  # an empty HOME for the CLI: no ~/.ray/auth_token of the machine's user
    processes: Callable[[], set[int]]  # the head's processes, and their workers and drivers

    def env(self, token: str | None = "cluster", **extra: str) -> dict[str, str]:
        """The CLI's environment: the cluster's token in RAY_AUTH_TOKEN, another, or none."""
        env = _clean_env()
        env["HOME"] = str(self.home)
        if token == "cluster":
            env["RAY_AUTH_TOKEN"] = self.token
        elif token is not None:
            env["RAY_AUTH_TOKEN"] = token
        env.update(extra)
        return env


def _clean_env() -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _proc(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, session id, command line) of a live process, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] == "Z":  # a zombie is already dead
        return None
    return int(fields[1]), int(fields[3]), cmdline


def _processes_of(session: int, marker: str) -> set[int]:
    """The head's processes: its session (ray start ran as a session leader), anything naming
    its temp dir, and their descendants (workers, job drivers)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _proc(int(entry.name))) is not None:
            table[int(entry.name)] = info
    found = {pid for pid, (_, sid, cmd) in table.items() if sid == session or marker in cmd}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        grew = bool(children)
        found |= children
    found.discard(os.getpid())
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _stop(session: int, marker: str) -> None:
    """SIGTERM the head's processes, SIGKILL what is left after a grace period."""
    _signal(_processes_of(session, marker), signal.SIGTERM)
    deadline = time.time() + 5
    while _processes_of(session, marker) and time.time() < deadline:
        time.sleep(0.5)
    for _ in range(3):
        left = _processes_of(session, marker)
        if not left:
            return
        _signal(left, signal.SIGKILL)
        time.sleep(1)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    temp = Path(tempfile.mkdtemp(prefix="bi-ray-", dir="/tmp"))  # short: socket path limits
    token = secrets.token_hex(32)
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics, node, objects = _free_ports(9)
    env = _clean_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    cmd = [
        _ray_executable(), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
        "--num-cpus=2", f"--temp-dir={temp / 'ray'}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node}", f"--object-manager-port={objects}",
        "--disable-usage-stats",
    ]  # fmt: skip
    starter = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    session = starter.pid
    try:
        out, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, f"ray start failed:\n{out}"
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # the job API answers once the dashboard's modules are up
            try:
                r = requests.get(
                    f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5
                )
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the dashboard's job API did not come up"
            time.sleep(1)
        home = temp / "home"
        home.mkdir()
        yield Head(address, token, home, lambda: _processes_of(session, str(temp)))
    finally:
        _stop(session, str(temp))
        left = _processes_of(session, str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes left behind: {sorted(left)}"


def _listening(pids: set[int]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses these processes' TCP sockets listen on, from /proc (Linux)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if (target := os.readlink(fd)).startswith("socket:["):
                        inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                raw = bytes.fromhex(fields[1].rsplit(":", 1)[0])  # 32-bit words, little-endian
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(ipaddress.ip_address(words))
    return found


def test_head_listens_on_loopback_only(head: Head) -> None:
    """`ray start --node-ip-address=127.0.0.1` alone listens on every interface; with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (tests/conftest.py) every port is on loopback."""
    addresses = _listening(head.processes())
    assert len(addresses) >= 5, addresses  # GCS, raylet, dashboard, agents: not vacuous
    mapped = [getattr(a, "ipv4_mapped", None) or a for a in addresses]  # ::ffff:127.0.0.1
    assert all(a.is_loopback for a in mapped), addresses


def cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def _cli_into_closed_pipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI writing into a pipe whose reader has gone, as `batch-infer ... | head` ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch_infer.cli", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc.stdout.close()  # the only reader: every write to stdout now fails with EPIPE
    stderr = proc.stderr.read()
    proc.wait(timeout=CLI_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


def _assert_no_token(result: subprocess.CompletedProcess, *tokens: str) -> None:
    for token in tokens:
        assert token not in result.stdout and token not in result.stderr


def _spec(path: Path, **changes: object) -> Path:
    doc = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    doc["input"]["path"] = str(ROOT / "data" / "digits")
    doc["model"]["onnx"] = str(ROOT / "models" / "digits.onnx")
    for key, value in changes.items():
        section, _, name = key.partition("__")
        doc[section][name] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _runs(out: Path) -> list[dict]:
    runs = run_records(out)
    return sorted(runs, key=lambda r: r["started_at"])


# --------------------------------------------------------------------------- tests


def test_quickstart_submit_wait_status_logs_list(head: Head, tmp_path: Path) -> None:
    out = tmp_path / "out" / "2024-05-01"  # {date} filled in at submit, passed on as --date
    spec = _spec(tmp_path / "quickstart.yaml", output__path=str(tmp_path / "out" / "{date}"))
    env = head.env()
    r = cli("submit", str(spec), "--address", head.address, "--date", "2024-05-01", "--wait",
            env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "batch-infer run digits: succeeded" in r.stdout  # the job's logs, streamed
    assert f"job {job_id}: SUCCEEDED" in r.stderr
    _assert_no_token(r, head.token)

    table = read_output(out)
    assert table.num_rows == 1797
    assert sorted(table.column("id").to_pylist()) == list(range(1797))
    # The driver read the carried copy of the model; the run names where the model lives.
    (run,) = _runs(out)
    assert run["status"] == "succeeded" and run["date"] == "2024-05-01"
    assert run["model"] == str(ROOT / "models" / "digits.onnx")

    # The package went as a py_module, the spec and model as the working_dir.
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    runtime_env = client.get_job_info(job_id).runtime_env
    assert runtime_env["py_modules"][0].startswith("gcs://")
    assert runtime_env["working_dir"].startswith("gcs://")
    assert head.token not in json.dumps(runtime_env)
    # where the model came from, for the run to record instead of Ray's upload path
    model = str(ROOT / "models" / "digits.onnx")
    assert runtime_env["env_vars"][MODEL_ORIGIN_ENV] == model

    status = cli("jobs", "status", job_id, "--address", head.address, env=env)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    assert "date: 2024-05-01" in status.stdout and f"model: {model}" in status.stdout
    logs = cli("jobs", "logs", job_id, "--address", head.address, env=env)
    assert logs.returncode == 0
    assert "batch-infer run digits: succeeded" in logs.stdout and "1,797" in logs.stdout
    listed = cli("jobs", "list", "--address", head.address, env=env)
    assert listed.returncode == 0
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(job_id)]
    assert "SUCCEEDED" in line and str(out) in line

    # machine-readable
    as_json = cli("jobs", "status", job_id, "--address", head.address, "--json", env=env)
    record = json.loads(as_json.stdout)
    assert (record["id"], record["status"], record["name"]) == (job_id, "SUCCEEDED", "digits")
    assert (record["date"], record["output"], record["model"]) == ("2024-05-01", str(out), model)
    assert record["driver_exit_code"] == 0
    started, ended = (dt.datetime.fromisoformat(record[k]) for k in ("started_at", "ended_at"))
    assert started.utcoffset() == dt.timedelta(0) and started <= ended
    listed_json = cli("jobs", "list", "--address", head.address, "--json", env=env)
    assert record in json.loads(listed_json.stdout)
    for result in (status, logs, listed, as_json, listed_json):
        _assert_no_token(result, head.token)

    # a reader that leaves early (`| head`): no BrokenPipeError, no traceback
    for args in (("status", job_id), ("list",), ("logs", job_id)):
        reader_gone = _cli_into_closed_pipe("jobs", *args, "--address", head.address, env=env)
        assert reader_gone.returncode == 0, reader_gone.stderr
        assert "Traceback" not in reader_gone.stderr and "BrokenPipe" not in reader_gone.stderr


def test_following_a_quiet_job_says_how_it_stands(head: Head) -> None:
    """A followed job that logs nothing for a while (pending, or busy in silence): the
    command says on stderr how the job stands instead of hanging mute; the logs still come
    whole, on stdout."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    code = "import time; print('first', flush=True); time.sleep(12); print('last')"
    job_id = client.submit_job(entrypoint=f'python -c "{code}"')
    env = head.env(BATCH_INFER_STALL_NOTICE_SECONDS="2")
    r = cli("jobs", "logs", job_id, "--follow", "--address", head.address, env=env)
    assert r.returncode == 0, r.stderr
    ours = [line for line in r.stdout.splitlines() if line in ("first", "last")]
    assert ours == ["first", "last"], r.stdout  # after lines of Ray's own
    # in its 12 s of sleep: after 2 s of silence, then after 4 s, 8 s (the logs reach the
    # client a few seconds late on a busy machine: at least the first two)
    notices = re.findall(
        rf"job {job_id} is (\w+)(?: \(.*\))?; nothing logged for (\d+) s", r.stderr
    )
    assert {("RUNNING", "2"), ("RUNNING", "4")} <= set(notices), r.stderr
    assert all(status in ("PENDING", "RUNNING") for status, _ in notices), r.stderr


def test_failed_job_exits_with_the_drivers_code(head: Head, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-input"
    spec = _spec(tmp_path / "bad.yaml", input__path=str(missing), output__path=str(tmp_path / "o"))
    job_id = f"bad-{secrets.token_hex(4)}"
    submit = ("submit", str(spec), "--address", head.address, "--submission-id", job_id)
    r = cli(*submit, "--wait", env=head.env())
    assert r.returncode == 2, r.stdout + r.stderr  # batch-infer run's exit code for a user error
    assert "error: " in r.stdout and str(missing) in r.stdout  # the driver's one-line error
    assert "Traceback" not in r.stdout
    assert r.stdout.splitlines()[0] == job_id
    assert f"job {job_id}: FAILED" in r.stderr

    # the ID is taken: one line, no server traceback
    again = cli(*submit, env=head.env())
    assert again.returncode == EXIT_USER_ERROR
    assert again.stderr.strip().splitlines() == [
        f"error: --submission-id {job_id}: the Ray cluster at {head.address} already has a job "
        "with this ID (FAILED); pick another ID"
    ]
    deleted = cli("jobs", "delete", job_id, "--address", head.address, env=head.env())
    assert deleted.returncode == 0, deleted.stderr
    gone = cli("jobs", "status", job_id, "--address", head.address, env=head.env())
    assert gone.returncode == EXIT_USER_ERROR
    assert f"has no job {job_id}" in gone.stderr and "Traceback" not in gone.stderr


def test_token_from_ray_default_file_and_token_path(head: Head, tmp_path: Path) -> None:
    (head.home / ".ray").mkdir(exist_ok=True)
    default = head.home / ".ray" / "auth_token"
    default.write_text(head.token + "\n")
    try:
        r = cli("jobs", "list", "--address", head.address, env=head.env(token=None))
        assert r.returncode == 0, r.stderr
        _assert_no_token(r, head.token)
    finally:
        default.unlink()
    path = tmp_path / "token"
    path.write_text(head.token)
    r = cli(
        "jobs", "list", "--address", head.address,
        env=head.env(token=None, RAY_AUTH_TOKEN_PATH=str(path)),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_missing_or_wrong_token_is_refused(head: Head, tmp_path: Path) -> None:
    spec = _spec(tmp_path / "quickstart.yaml", output__path=str(tmp_path / "out"))
    missing = cli("submit", str(spec), "--address", head.address, env=head.env(token=None))
    assert missing.returncode == 2
    assert f"the Ray cluster at {head.address} requires a token" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "Traceback" not in missing.stderr

    wrong = secrets.token_hex(32)
    refused = cli("submit", str(spec), "--address", head.address, "--wait",
                  env=head.env(token=wrong))  # fmt: skip
    assert refused.returncode == 2
    assert "refused the token from RAY_AUTH_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr

    path = tmp_path / "token"
    path.write_text(wrong)
    listed = cli("jobs", "list", "--address", head.address,
                 env=head.env(token=None, RAY_AUTH_TOKEN_PATH=str(path)))  # fmt: skip
    assert listed.returncode == 2
    assert f"refused the token from the file RAY_AUTH_TOKEN_PATH names ({path})" in listed.stderr
    no_file = head.env(token=None, RAY_AUTH_TOKEN_PATH=str(tmp_path / "none"))
    unreadable = cli("jobs", "list", "--address", head.address, env=no_file)
    assert unreadable.returncode == 2
    assert "cannot read the Ray token from the file RAY_AUTH_TOKEN_PATH names" in unreadable.stderr
    for result in (missing, refused, listed, unreadable):
        _assert_no_token(result, head.token, wrong)
    assert not (tmp_path / "out").exists()  # nothing was submitted


def _heavy_model(path: Path, width: int = 1024, repeats: int = 384) -> Path:
    """x float[N,16] -> y float[N,1] through `repeats` tanh(h @ W): ~8 ms a row on one core
    here, so a job of 6,000 rows keeps two cores busy for about 25 s."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, width)) / 4).astype(np.float32), "w0"),
        numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"
        ),
        numpy_helper.from_array((rng.standard_normal((width, 1))).astype(np.float32), "w1"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"])]
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{repeats}", "w1"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _heavy_job(tmp_path: Path, rows: int = 6000) -> Path:
    """A spec over `rows` rows of x float[16] through the heavy model, output under out/."""
    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(0).random((rows, 16), dtype=np.float32)
    pq.write_table(
        pa.table(
            {
                "id": np.arange(rows, dtype=np.int64),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16),
            }
        ),
        data / "part-0.parquet",
        row_group_size=1200,
    )
    spec = tmp_path / "heavy.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "heavy",
                "input": {"path": str(data)},
                "model": {"onnx": str(_heavy_model(tmp_path / "heavy.onnx")), "inputs": {"x": "x"}},
                "output": {"path": str(tmp_path / "out"), "keep_columns": ["id"]},
            }
        )
    )
    return spec


def test_submit_carries_tokenizer_labels_and_the_hooks_package(head: Head, tmp_path: Path) -> None:
    """The text example with a preprocess hook from a package of the user's own, submitted
    from its folder with relative paths: the cluster runs it from the carried copies (the
    job's working_dir is not that folder) and writes what the same spec writes locally."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    for name in ("reviews.onnx", "reviews.tokenizer.json", "reviews.labels.txt"):
        shutil.copy(ROOT / "models" / name, project / "models" / name)
    shutil.copytree(ROOT / "data" / "reviews", project / "data" / "reviews")
    (project / "review_hooks").mkdir()
    (project / "review_hooks" / "__init__.py").write_text("")
    (project / "review_hooks" / "prep.py").write_text(
        "import numpy as np\n\n\ndef mask(table):\n"
        "    return {'attention_mask': np.ones((table.num_rows, 16), np.int64)}\n"
    )
    doc = yaml.safe_load((ROOT / "jobs" / "text.yaml").read_text())
    del doc["model"]["inputs"]["attention_mask"]
    doc["model"]["preprocess"] = "review_hooks.prep:mask"
    doc["output"]["path"] = str(tmp_path / "cluster")
    (project / "job.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    env = head.env()

    sent = yaml.safe_load(cli("submit", "job.yaml", "--dry-run", env=env, cwd=project).stdout)
    tokenizer, labels = "files/0/reviews.tokenizer.json", "files/1/reviews.labels.txt"
    assert {"model/reviews.onnx", tokenizer, labels} <= set(sent["runtime_env"]["files"])
    assert sent["spec"]["model"]["inputs"]["input_ids"]["tokenizer"] == tokenizer
    assert sent["spec"]["model"]["postprocess"]["labels"] == labels
    assert sent["runtime_env"]["py_modules"][1] == str(project / "review_hooks")

    r = cli("submit", "job.yaml", "--address", head.address, "--wait", env=env, cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    local = cli("run", "job.yaml", "-q", "--set", f"output.path={tmp_path / 'local'}",
                env=env, cwd=project)  # fmt: skip
    assert local.returncode == 0, local.stderr
    cluster, mine = (read_output(tmp_path / d).sort_by("id") for d in ("cluster", "local"))
    assert cluster.num_rows == mine.num_rows > 0
    assert cluster.column("label").to_pylist() == mine.column("label").to_pylist()
    assert np.allclose(cluster.column("score").to_numpy(), mine.column("score").to_numpy())
    errors = pq.read_table(tmp_path / "cluster" / "_errors")
    assert errors.num_rows == 1 and errors.column("text").to_pylist() == [None]

    (project / "review_hooks" / "__init__.py").unlink()
    (project / "review_hooks" / "prep.py").unlink()
    (project / "review_hooks").rmdir()
    gone = cli("submit", "job.yaml", "--dry-run", env=env, cwd=project)
    assert gone.returncode == EXIT_USER_ERROR
    assert "no module 'review_hooks' here" in gone.stderr and "Traceback" not in gone.stderr


def test_stopped_job_resubmitted_resumes_exactly_once(head: Head, tmp_path: Path) -> None:
    rows, shard_rows = 6000, 60  # 100 shards of ~0.5 s of compute each: ~25 s on two cores
    spec, out = _heavy_job(tmp_path, rows), tmp_path / "out"
    sets = ["--set", f"shard_rows={shard_rows}", "--set", "batch_size=20"]
    env = head.env()
    first = cli("submit", str(spec), "--address", head.address, *sets, env=env)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.splitlines()[0]

    # Stop it as soon as it has committed a shard: the stop lands seconds later, while most
    # of the 25 s of work is still ahead, and the status below proves it was mid-run.
    shards = out / "_manifest" / "shards"
    deadline = time.time() + 150
    while not any(shards.glob("*.json")):
        assert time.time() < deadline, cli("jobs", "logs", job_id, "--address", head.address,
                                           env=env).stdout  # fmt: skip
        time.sleep(0.1)
    stop = cli("jobs", "stop", job_id, "--address", head.address, "--wait", env=env)
    assert stop.returncode == 0, stop.stderr
    status = cli("jobs", "status", job_id, "--address", head.address, env=env)
    assert f"{job_id}: STOPPED" in status.stdout  # not SUCCEEDED: it was stopped mid-run
    committed = len(list(shards.glob("*.json")))
    total = rows // shard_rows  # row groups of 1200 rows: 20 shards each
    assert 0 < committed < total, "the job was not stopped mid-run"

    again = cli("submit", str(spec), "--address", head.address, *sets, "--wait", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "batch-infer run heavy: succeeded" in again.stdout

    table = read_output(out)
    assert table.num_rows == rows
    assert sorted(table.column("id").to_pylist()) == list(range(rows))  # one copy of each
    last = _runs(out)[-1]
    assert last["status"] == "succeeded"
    assert last["shards_skipped"] >= committed
    assert last["shards_total"] == total
    assert last["shards_skipped"] + last["shards_committed"] == total
    assert len(list(shards.glob("*.json"))) == total
    for result in (first, stop, status, again):
        _assert_no_token(result, head.token)


class Proxy:
    """A TCP proxy in front of the dashboard, as an ingress or `kubectl port-forward` is:
    `cut()` drops the connections open now (the network failed); with no `target` it answers
    every request 503 (its backend is down)."""

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        self.requests: list[bytes] = []
        self.answered: list[bytes] = []  # requests whose answer has begun to flow back
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        first = client.recv(65536)
        if self.target is None:
            body = b"no healthy upstream"
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target))
        upstream.sendall(first)
        self.open += [client, upstream]
        self.requests.append(first)
        back = threading.Thread(target=self._pipe, args=(upstream, client, first), daemon=True)
        back.start()
        self._pipe(client, upstream)

    def _pipe(self, src: socket.socket, dst: socket.socket, request: bytes = b"") -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
                if request:  # the answer to `request` flows: a stream is established
                    self.answered.append(request)
                    request = b""
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Drop every open connection (shutdown wakes the pipes blocked reading them)."""
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_cluster_failures_exit_5_and_a_running_job_is_not_deleted(head: Head, tmp_path: Path):
    env = head.env()
    down = Proxy(target=None)
    try:
        failed = cli("jobs", "list", "--address", f"http://127.0.0.1:{down.port}", env=env)
    finally:
        down.close()
    assert failed.returncode == EXIT_CLUSTER, failed.stderr  # "retry later"
    assert "failed (503): no healthy upstream" in failed.stderr
    assert "Traceback" not in failed.stderr

    spec = _heavy_job(tmp_path, rows=48000)  # minutes in small batches: stopped long before
    sets = ["--set", "shard_rows=60", "--set", "batch_size=20"]
    first = cli("submit", str(spec), "--address", head.address, *sets, env=env)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.splitlines()[0]
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    try:
        deadline = time.time() + CLI_TIMEOUT
        while str(client.get_job_status(job_id)) != "RUNNING":
            assert time.time() < deadline, client.get_job_info(job_id)
            time.sleep(0.2)
        running = cli("jobs", "delete", job_id, "--address", head.address, env=env)
        assert running.returncode == EXIT_USER_ERROR
        assert f"job {job_id} is RUNNING: stop it first" in running.stderr

        proxy = Proxy(target=int(head.address.rsplit(":", 1)[1]))
        follower = subprocess.Popen(
            [sys.executable, "-m", "batch_infer.cli", "jobs", "logs", job_id, "--follow",
             "--address", f"http://127.0.0.1:{proxy.port}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + CLI_TIMEOUT
        while not any(b"/logs/tail" in r for r in proxy.answered):  # following: cut it
            assert time.time() < deadline and follower.poll() is None, follower.communicate()
            time.sleep(0.1)
        proxy.cut()
        _, err = follower.communicate(timeout=CLI_TIMEOUT)
        proxy.close()
        info = client.get_job_info(job_id)
        assert str(info.status) == "RUNNING", info  # the stream broke, not the job
        assert follower.returncode == EXIT_CLUSTER, err  # the job runs on: retry later
        assert f"Ray dashboard at http://127.0.0.1:{proxy.port}" in err and "Traceback" not in err
    finally:
        cli("jobs", "stop", job_id, "--address", head.address, "--wait", env=env)
    status = cli("jobs", "status", job_id, "--address", head.address, "--json", env=env)
    assert json.loads(status.stdout)["status"] == "STOPPED"  # it ran on until stopped


def test_carried_spec(tmp_path: Path) -> None:
    """What goes to the cluster: the spec as validated here, dated, model path rewritten."""
    spec = _spec(
        tmp_path / "dated.yaml",
        output__path=str(tmp_path / "out{{x}}" / "{date:%Y/%m}"),
        model__onnx=str(ROOT / "models" / "digits.onnx"),
    )
    sub = Submission(str(spec), ["batch_size=64"], shared_model=False, cluster_is_local=True,
                     date=dt.date(2024, 5, 1))  # fmt: skip
    assert sub.spec.output.path == str(tmp_path / "out{x}" / "2024" / "05")
    assert sub.entrypoint() == "python -m batch_infer.cli run spec.yaml --date 2024-05-01"
    carried = yaml.safe_load(sub.spec_text)
    assert "date" not in carried and carried["batch_size"] == 64
    assert carried["model"]["onnx"] == "model/digits.onnx"
    assert carried["output"]["path"] == str(tmp_path / "out{{x}}" / "2024" / "05")  # literal
    # The driver reads it back to the same paths and date.
    again = resolve_spec(carried, date=dt.date(2024, 5, 1))
    assert again.output.path == sub.spec.output.path and again.date == "2024-05-01"
    assert sub.warnings == []


def test_external_data_is_carried_from_the_models_folder_only(tmp_path: Path) -> None:
    """The files come from batch_infer.model's scan of the graph; none from outside its folder."""
    folder = tmp_path / "m"
    folder.mkdir()
    model = onnx.load(str(_heavy_model(folder / "heavy.onnx", width=64, repeats=2)))
    onnx.save(model, folder / "ext.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)  # fmt: skip
    assert model_files(folder / "ext.onnx") == [
        (folder / "ext.onnx", "model/ext.onnx"),
        (folder / "weights.bin", "model/weights.bin"),
    ]
    outside = onnx.load(str(folder / "ext.onnx"), load_external_data=False)
    for tensor in outside.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(outside, folder / "outside.onnx")
    with pytest.raises(
        SpecError, match=r"keeps weights in '\.\./weights\.bin', outside its folder"
    ):
        model_files(folder / "outside.onnx")


def test_model_too_large_to_carry(tmp_path: Path) -> None:
    big = tmp_path / "big.onnx"
    with big.open("wb") as f:  # sparse: no disk used
        f.truncate(CARRY_LIMIT)
    spec = _spec(tmp_path / "big.yaml", output__path=str(tmp_path / "out"))
    doc = yaml.safe_load(spec.read_text())
    doc["model"]["onnx"] = str(big)
    spec.write_text(yaml.safe_dump(doc))
    r = cli("submit", str(spec), "--address", "http://127.0.0.1:9", env=_clean_env())
    assert r.returncode == 2
    assert f"model.onnx: {big} is 100.0 MiB" in r.stderr
    assert "carries at most 100.0 MiB" in r.stderr and "--shared-model" in r.stderr


def test_relative_paths_warned_and_unreachable_cluster(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "data" / "digits", tmp_path / "digits")
    spec = _spec(tmp_path / "rel.yaml", input__path="digits", output__path="out/digits")
    port = _free_ports(1)[0]
    r = cli("submit", "rel.yaml", "--address", f"127.0.0.1:{port}", env=_clean_env(),
            cwd=tmp_path)  # fmt: skip
    assert spec.exists() and r.returncode == EXIT_CLUSTER  # nothing listens: retry later
    assert "warning: input.path: 'digits' is relative" in r.stderr
    assert "warning: output.path: 'out/digits' is relative" in r.stderr
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in r.stderr
    bad = cli("submit", "rel.yaml", "--address", "http://127.0.0.1:99999", env=_clean_env(),
              cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2  # a typo in the address, not a cluster to retry later
    assert "--address http://127.0.0.1:99999: Port out of range 0-65535" in bad.stderr


def test_dry_run_prints_what_would_be_sent_and_sends_nothing(tmp_path: Path) -> None:
    spec = _spec(tmp_path / "q.yaml", output__path=str(tmp_path / "out" / "{date}"))
    port = _free_ports(1)[0]  # nothing listens there: a contact would fail
    r = cli("submit", str(spec), "--dry-run", "--address", f"127.0.0.1:{port}", "--date",
            "2024-05-01", "--set", "batch_size=64", env=_clean_env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    sent = yaml.safe_load(r.stdout)
    assert sent["entrypoint"] == "python -m batch_infer.cli run spec.yaml --date 2024-05-01"
    model = ROOT / "models" / "digits.onnx"
    assert sent["runtime_env"]["files"]["model/digits.onnx"].startswith(str(model))
    assert sent["runtime_env"]["env_vars"][MODEL_ORIGIN_ENV] == str(model)
    assert sent["spec"]["batch_size"] == 64 and sent["spec"]["model"]["onnx"] == "model/digits.onnx"
    assert sent["metadata"]["batch_infer_output"] == str(tmp_path / "out" / "2024-05-01")
    assert not (tmp_path / "out").exists()

    # without an address there is nothing to reach: local paths are warned about
    r = cli("submit", str(spec), "--dry-run", env=_clean_env())
    assert r.returncode == 0
    assert "warning: output.path:" in r.stderr and "every node must see it" in r.stderr

    # a knob set here goes with the job; a bad one stops the command before anything is sent
    knobs = {"BATCH_INFER_GPU_DECODERS": "6", "BATCH_INFER_NVIMGCODEC_OPTIONS": ":x=1"}
    r = cli("submit", str(spec), "--dry-run", env=_clean_env() | knobs)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["runtime_env"]["env_vars"].items() >= knobs.items()
    bad = {"BATCH_INFER_STALL_NOTICE_SECONDS": "soon"}
    r = cli("submit", str(spec), "--address", f"127.0.0.1:{port}", env=_clean_env() | bad)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: environment variable BATCH_INFER_STALL_NOTICE_SECONDS=")
