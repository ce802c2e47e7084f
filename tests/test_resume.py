"""Exactly once under failure: a killed driver, a killed actor, a changed input, two runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray
import yaml

import batch_infer
from batch_infer.errors import OutputError
from tests.conftest import (
    ROOT,
    assert_matches_direct,
    make_table,
    read_output,
    run_records,
    two_io_spec,
)


def _big_input(root: Path, files: int = 4, rows: int = 4000) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        pq.write_table(
            make_table(rows, start=i * rows, seed=i), root / f"f{i}.parquet", row_group_size=100
        )
    return root


def _committed(out: Path) -> dict[str, dict]:
    d = out / "_manifest" / "shards"
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")} if d.exists() else {}


def _named_actor(part: str) -> tuple[str, Any] | None:
    """(name, handle) of the first named actor of this Ray whose name holds `part`."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if part in actor["name"]:
            return actor["name"], ray.get_actor(actor["name"], namespace=actor["namespace"])
    return None


def _inputs(data: Path):
    import pyarrow as pa

    return pa.concat_tables(pq.read_table(p) for p in sorted(data.glob("*.parquet")))


def _start_driver(spec_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "batch_infer.cli", "run", str(spec_path), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait_for_commits(
    out: Path, at_least: int, proc: subprocess.Popen | None = None, timeout: float = 120
) -> None:
    """Until `at_least` shards are committed (by `proc`, a driver that must not exit first)."""
    deadline = time.time() + timeout
    while len(_committed(out)) < at_least:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited early: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "no shard was committed in time"
        time.sleep(0.05)


def _settled(out: Path, quiet: float = 3.0) -> dict[str, dict]:
    """The committed entries once they stop changing: a writer caught mid-commit by the kill
    of its raylet may still finish that one commit."""
    seen, since = _committed(out), time.time()
    while time.time() - since < quiet:
        time.sleep(0.2)
        now = _committed(out)
        if now.keys() != seen.keys():
            seen, since = now, time.time()
    return seen


def test_driver_sigkill_then_rerun_resumes(tmp_path, models):
    """SIGKILL the driver mid-run; rerun: one copy of every row, committed shards kept."""
    data = _big_input(tmp_path / "in")
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=200, batch_size=20)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = _start_driver(spec_path)
    try:
        _wait_for_commits(out, 3, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    finally:
        proc.wait(timeout=60)
    before = _settled(out)
    total = 80  # 16000 rows / 200
    assert 3 <= len(before) < total, "the kill must land mid-run"
    files_before = {
        name: (out / name).stat().st_mtime_ns
        for e in before.values()
        for name in e["files"]
        if (out / name).exists()
    }
    assert (out / "_LOCK").exists() and not (out / "_SUCCESS").exists()

    rerun = subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", "run", str(spec_path), "--quiet"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    after = _committed(out)
    assert len(after) == total
    for shard, entry in before.items():  # committed shards were not recomputed
        assert after[shard]["run"] == entry["run"]
    for name, mtime in files_before.items():
        assert (out / name).stat().st_mtime_ns == mtime
    assert_matches_direct(models["two_io"], _inputs(data), read_output(out))
    runs = run_records(out)
    assert [r["status"] for r in runs] == ["succeeded"]  # the killed run could not write one
    assert runs[0]["shards_skipped"] == len(before)
    assert not (out / "_staging").exists()


@pytest.mark.usefixtures("ray_start_regular")
def test_actor_killed_mid_shard_is_retried_without_duplicates(tmp_path, models):
    data = _big_input(tmp_path / "in", files=4, rows=6000)  # long enough to kill it mid-run
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=150, batch_size=10)
    killed: list[str] = []

    def kill_one_actor() -> None:
        """Kill an actor that has committed a shard: it is loaded and holds the next ones (an
        actor still loading holds none, and killing it would retry nothing)."""
        _wait_for_commits(out, 2)
        working = next(iter(_committed(out).values()))["actor"]
        if found := _named_actor(f":infer-{working}-"):
            ray.kill(found[1], no_restart=True)
            killed.append(found[0])

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    summary = batch_infer.run(spec)
    killer.join()
    assert killed, "no actor was killed"
    assert summary.retries >= 1
    assert summary.status == "succeeded" and summary.rows == 24000
    assert_matches_direct(models["two_io"], _inputs(data), read_output(out))
    attempts = [e["attempt"] for e in _committed(out).values()]
    assert max(attempts) >= 1


@pytest.mark.usefixtures("ray_start_regular")
def test_writer_killed_mid_commit_is_retried_without_duplicates(tmp_path, models):
    """The writer's process dies (SIGKILL) while commits flow: its shards are retried."""
    data = _big_input(tmp_path / "in", files=4, rows=6000)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=150, batch_size=10)
    killed: list[int] = []

    def kill_the_writer() -> None:
        _wait_for_commits(out, 2)
        if found := _named_actor(":writer-"):
            pid = ray.get(found[1].__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_the_writer)
    killer.start()
    summary = batch_infer.run(spec)
    killer.join()
    assert killed, "no writer was killed"
    assert summary.status == "succeeded" and summary.rows == 24000
    assert_matches_direct(models["two_io"], _inputs(data), read_output(out))
    assert not (out / "_staging").exists()


@pytest.mark.usefixtures("ray_start_regular")
def test_changed_input_is_refused_then_overwrite_starts_over(tmp_path, models):
    data = _big_input(tmp_path / "in", files=2, rows=300)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"])
    batch_infer.run(spec)
    time.sleep(0.01)
    pq.write_table(make_table(300, start=0, seed=99), data / "f0.parquet")
    with pytest.raises(OutputError, match=r"input changed since shard .* \(f0.parquet"):
        batch_infer.run(spec)
    assert (out / "_SUCCESS").exists()  # the refused run changed nothing
    assert len(_committed(out)) == 2
    summary = batch_infer.run(spec, overwrite=True)
    assert summary.shards_committed == 2 and summary.shards_skipped == 0
    assert_matches_direct(models["two_io"], _inputs(data), read_output(out))


@pytest.mark.usefixtures("ray_start_regular")
def test_changed_model_is_refused(tmp_path, models):
    data = _big_input(tmp_path / "in", files=1, rows=100)
    out = tmp_path / "out"
    batch_infer.run(two_io_spec(data, out, models["two_io"]))
    spec = {
        "name": "other",
        "input": {"path": str(data)},
        "model": {"onnx": models["linear"], "inputs": {"x": ["a", "b", "c"]}},
        "output": {"path": str(out)},
    }
    with pytest.raises(OutputError, match="different model_sha256"):
        batch_infer.run(spec)


@pytest.mark.usefixtures("ray_start_regular")
def test_second_run_into_same_output_is_refused(tmp_path, models):
    """A run holding the output (another process) makes a second run fail at once."""
    data = _big_input(tmp_path / "in", files=1, rows=100)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from batch_infer.sink.manifest import OutputLock;"
            "from batch_infer.location import open_location;"
            f"lock = OutputLock(open_location({str(out)!r}, 'out'), 'first-run'); lock.acquire();"
            "print('held', flush=True); time.sleep(120)",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError) as err:
            batch_infer.run(two_io_spec(data, out, models["two_io"]))
        assert "another batch-infer run is writing to this output" in str(err.value)
        assert f"run first-run, pid {holder.pid}" in str(err.value)
        assert not list(out.glob("part-*")) and not (out / "_manifest").exists()
    finally:
        holder.kill()
        holder.wait()
    summary = batch_infer.run(two_io_spec(data, out, models["two_io"]))  # free once it is gone
    assert summary.status == "succeeded"


# --------------------------------------------------------------------------- the protocol


def test_a_config_key_dropped_since_is_a_change(tmp_path):
    """Keys the spec adds only when it uses them (postprocess, decoded_inputs, optimize):
    dropping one must be refused like changing one, or outputs of two kinds would mix."""
    from batch_infer.sink.manifest import OutputSink, RunRecord

    config = {"model_sha256": "m", "outputs": {"y": "y"}, "postprocess": {"top_k": 1}}
    sink = OutputSink(str(tmp_path / "out"))
    sink.on_write_start("r1", config, {})
    sink.record_run(RunRecord("r1", "job"))
    plain = {k: v for k, v in config.items() if k != "postprocess"}
    with pytest.raises(OutputError, match="computed with a different postprocess; rerun with"):
        OutputSink(str(tmp_path / "out")).on_write_start("r2", plain, {})
    OutputSink(str(tmp_path / "out")).on_write_start("r3", config, {})  # as before: resumes


def test_a_corrupt_manifest_file_is_one_line_naming_it(tmp_path, models):
    """What a crash or a hand can leave: an empty shard entry, a job.json that is no JSON.
    One line naming the file; deleting the entry computes its shard again, exactly once."""
    data = _big_input(tmp_path / "in", files=1, rows=300)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=100)
    batch_infer.run(spec)
    entry = sorted((out / "_manifest" / "shards").glob("*.json"))[0]
    entry.write_text("")
    with pytest.raises(OutputError) as err:
        batch_infer.run(spec)
    assert str(err.value).startswith(f"{entry}: unreadable (")
    assert str(err.value).endswith(
        "; delete that file to compute its shard again, or rerun with --overwrite"
    )
    entry.write_text("[1, 2]")
    with pytest.raises(OutputError, match=rf"^{entry}: not a shard entry \(AttributeError"):
        batch_infer.run(spec)
    entry.unlink()
    summary = batch_infer.run(spec)
    assert (summary.shards_committed, summary.shards_skipped) == (1, 2)
    assert_matches_direct(models["two_io"], _inputs(data), read_output(out))
    (out / "_manifest" / "job.json").write_text("{")
    with pytest.raises(
        OutputError, match=r"job\.json: unreadable \(.*\); rerun with --overwrite to"
    ):
        batch_infer.run(spec)


def test_a_lock_on_an_object_store_is_refreshed_while_held(tmp_path):
    """Outputs off the local disk (s3://, gs://) are locked by a file its holder refreshes:
    a thread refreshes it however long the run's own work takes, a stale one is taken
    over, and a run that lost it never deletes the new holder's lock nor marks success."""
    import pyarrow.fs as pafs

    from batch_infer.errors import OutputFailedError
    from batch_infer.location import Location
    from batch_infer.sink.manifest import LOCK_INFO, OutputLock

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a local disk
    out = Location(fs, "out", "remote://out")
    assert not out.is_local
    first = OutputLock(out, "r1", stale_after=0.8)
    first.acquire()
    time.sleep(1.6)  # twice the time after which an unrefreshed lock is stale
    with pytest.raises(OutputError, match=r"another batch-infer run is writing .*\(run r1,"):
        OutputLock(out, "r2", stale_after=0.8).acquire()
    first.release()
    assert not out.exists(LOCK_INFO)
    # r3 takes over a lock r1 holds (as if r1's process had stalled past stale_after)
    first = OutputLock(out, "r1", stale_after=0.8)
    first.acquire()
    out.write_json(LOCK_INFO, {"run": "r3", "pid": 1, "host": "h", "heartbeat": time.time()})
    time.sleep(0.6)  # r1's next refresh finds r3's lock
    with pytest.raises(OutputFailedError, match=r"out: run r3 \(pid 1 on h\) took this output"):
        first.check()
    first.release()
    assert out.read_json(LOCK_INFO)["run"] == "r3"


@pytest.mark.usefixtures("ray_start_regular")
def test_a_run_that_fails_ends_its_actors(tmp_path):
    """A run that stops on an error (here: no actor can load the model) ends its actors and
    writers, so the next run in the same process (a backfill's next date, a notebook) gets
    their cores or GPUs, and no writer of the failed run commits behind its back."""
    import onnx
    from onnx import TensorProto, helper

    from batch_infer.errors import BackendError
    from tests.conftest import write_parquet_dataset

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    node = helper.make_node("Nope", ["x"], ["y"], domain="com.example")
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets)
    onnx.save(model, tmp_path / "nope.onnx")
    data = write_parquet_dataset(tmp_path / "in", files=1, rows=100)
    spec = {
        "name": "nope",
        "input": {"path": str(data)},
        "model": {"onnx": str(tmp_path / "nope.onnx"), "inputs": {"x": ["a", "b", "c"]}},
        "output": {"path": str(tmp_path / "out")},
        "num_actors": 2,
    }
    with pytest.raises(BackendError, match="is not a registered function/op"):
        batch_infer.run(spec)
    deadline = time.time() + 30
    while alive := [a for a in ray.util.list_named_actors() if a.startswith("batch-infer:")]:
        assert time.time() < deadline, alive
        time.sleep(0.2)


def test_a_file_that_changes_after_planning_fails_its_shards_in_few_lines(tmp_path):
    """A file replaced while the run goes on (its shards were planned from the old one):
    its shards are not read, or rows of two versions would mix, and the run's error lists a
    few of the failures, not hundreds of lines."""
    from batch_infer.data.reading import open_dataset, read_rows
    from batch_infer.data.sharding import plan_shards
    from batch_infer.errors import InputError, JobFailedError
    from batch_infer.sink.manifest import OutputSink, RunRecord

    data = _big_input(tmp_path / "in", files=1, rows=400)
    dataset = open_dataset(str(data), "parquet")
    shard = plan_shards(dataset, 100)[0]
    pq.write_table(make_table(500, seed=7), data / "f0.parquet", row_group_size=100)
    with pytest.raises(InputError, match=r"f0\.parquet: changed since the run planned its shards"):
        read_rows(dataset, shard.file, ["a"], set(), shard.row_groups, shard.first_row)
    (data / "f0.parquet").unlink()
    with pytest.raises(InputError, match=r"f0\.parquet: is gone since the run planned"):
        read_rows(dataset, shard.file, ["a"], set(), shard.row_groups, shard.first_row)

    sink = OutputSink(str(tmp_path / "out"))
    sink.on_write_start("r1", {}, {})
    record = RunRecord("r1", "job", shards_failed=25, errors=[f"shard {i}: no" for i in range(25)])
    with pytest.raises(JobFailedError) as err:
        sink.on_write_complete(record, [], 0)
    lines = str(err.value).splitlines()
    assert lines[1:] == [
        *(f"  shard {i}: no" for i in range(10)),
        "  ... and 15 more, in the run's record (_runs/)",
    ]
