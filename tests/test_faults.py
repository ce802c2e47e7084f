"""Faults a daily user meets, each reproduced for real (docs/reliability.md has the matrix).

Every bad input or output ends in one line and exit 2 with nothing half-written; every fault
ends, after the documented recovery (rerun the same command), with every input row exactly
once. The disk-full and read-only cases mount a small tmpfs, so they need root (CI's
machine is root; elsewhere they are skipped, saying why).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ROOT, make_table, read_output, run_records, two_io_spec

WIDTH, HIDDEN = 64, 1536


def _heavy_model(path: Path) -> str:
    """x float[N, 64] -> y float[N, 1]: two wide layers, so a shard takes a moment."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.05, name)
        for name, shape in (("w0", (WIDTH, HIDDEN)), ("w1", (HIDDEN, HIDDEN)), ("w2", (HIDDEN, 1)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def _vectors(root: Path, files: int = 4, rows: int = 6000) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        x = np.random.default_rng(i).standard_normal((rows, WIDTH)).astype(np.float32)
        table = pa.table(
            {
                "id": np.arange(i * rows, (i + 1) * rows),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), WIDTH),
            }
        )
        pq.write_table(table, root / f"f{i}.parquet", row_group_size=500)
    return root


def _spec(tmp: Path, data: Path, out: Path, model: str, **extra: object) -> Path:
    doc = {
        "name": "faults",
        "input": {"path": str(data)},
        "model": {"onnx": model, "inputs": {"x": "x"}},
        "batch_size": 250,
        "shard_rows": 500,
        "output": {"path": str(out), "keep_columns": ["id"]},
        **extra,
    }
    path = tmp / f"job-{len(list(tmp.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", *args], capture_output=True, text=True,
        timeout=timeout, env={**env, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def _one_line_error(done: subprocess.CompletedProcess, code: int = 2) -> str:
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def _committed(out: Path) -> dict[str, dict]:
    d = out / "_manifest" / "shards"
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")} if d.exists() else {}


def _assert_exactly_once(out: Path, rows: int) -> None:
    ids = read_output(out)["id"].to_pylist()
    assert sorted(ids) == list(range(rows)), f"{len(ids)} rows for {rows} ids"


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small file system of our own (a full disk, a read-only one), as root only."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --------------------------------------------------------------------------- paths


def test_input_through_a_symlink_to_the_output_folder_is_refused(tmp_path, models):
    """The output lies inside the input however the input is spelled: refused, not re-read."""
    real = tmp_path / "real"
    data = real / "data"
    data.mkdir(parents=True)
    pq.write_table(make_table(100), data / "f.parquet")
    (tmp_path / "link").symlink_to(real)
    spec = tmp_path / "job.yaml"
    doc = two_io_spec(tmp_path / "link", real / "predictions", models["two_io"])
    spec.write_text(yaml.safe_dump(doc))
    line = _one_line_error(_cli("run", str(spec), "-q"))
    assert "is inside the input directory" in line
    assert not (real / "predictions").exists()


def test_input_inside_the_output_is_refused_and_overwrite_deletes_nothing(tmp_path, models):
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    pq.write_table(make_table(100), out / "raw" / "f.parquet")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(two_io_spec(out / "raw", out, models["two_io"])))
    line = _one_line_error(_cli("run", str(spec), "--overwrite", "-q"))
    assert "is inside the output directory" in line and "--overwrite would delete it" in line
    assert (out / "raw" / "f.parquet").exists()


def test_output_under_a_regular_file_is_one_line(tmp_path, models):
    (tmp_path / "file").write_text("not a folder")
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(make_table(100), data / "f.parquet")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(two_io_spec(data, tmp_path / "file" / "out", models["two_io"])))
    line = _one_line_error(_cli("run", str(spec), "-q"))
    assert "Not a directory" in line and str(tmp_path / "file") in line


def test_text_column_stacked_into_a_float_input_is_a_spec_error(tmp_path, models):
    data = tmp_path / "in"
    data.mkdir()
    table = make_table(50).append_column("note", pa.array(["x"] * 50))
    pq.write_table(table, data / "f.parquet")
    doc = two_io_spec(data, tmp_path / "out", models["two_io"])
    doc["model"]["inputs"]["feat"] = ["a", "b", "note"]
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(doc))
    line = _one_line_error(_cli("run", str(spec), "-q"))
    assert "column 'note'" in line and "is text, not numbers" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the disk


def test_read_only_output_is_one_line_and_a_rerun_works_once_writable(tmp_path, models):
    data = _vectors(tmp_path / "in", files=1, rows=1000)
    model = _heavy_model(tmp_path / "heavy.onnx")
    with _tmpfs(tmp_path / "ro", "16m") as mount:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        spec = _spec(tmp_path, data, mount / "out", model)
        line = _one_line_error(_cli("run", str(spec), "-q"))
        assert "Read-only file system" in line and "choose another output.path" in line
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        again = _cli("run", str(spec), "-q")
        assert again.returncode == 0, again.stderr
        _assert_exactly_once(mount / "out", 1000)


def test_disk_full_at_start_leaves_nothing_that_blocks_a_rerun(tmp_path, models):
    data = _vectors(tmp_path / "in", files=1, rows=1000)
    model = _heavy_model(tmp_path / "heavy.onnx")
    with _tmpfs(tmp_path / "small", "64k") as mount:
        filler = mount / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            f.write(b"\0" * (1 << 20))  # fill it up
        spec = _spec(tmp_path, data, mount / "out", model)
        line = _one_line_error(_cli("run", str(spec), "-q"))
        assert "No space left on device" in line and "free some space" in line
        leftovers = [p.name for p in (mount / "out").glob("*")] if (mount / "out").exists() else []
        assert not [n for n in leftovers if ".tmp-" in n], leftovers
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
        again = _cli("run", str(spec), "-q")
        assert again.returncode == 0, again.stderr
        _assert_exactly_once(mount / "out", 1000)


def test_disk_full_during_a_commit_stops_at_once_then_the_rerun_is_exact(tmp_path, models):
    rows = 24000
    data = _vectors(tmp_path / "in", files=4, rows=rows // 4)
    model = _heavy_model(tmp_path / "heavy.onnx")
    with _tmpfs(tmp_path / "small", "160k") as mount:
        spec = _spec(tmp_path, data, mount / "out", model)
        started = time.time()
        line = _one_line_error(_cli("run", str(spec), "-q"))
        assert "No space left on device while committing shard" in line
        assert "rows committed by this run are kept" in line and "free some space" in line
        assert time.time() - started < 120  # no retries of a full disk
        committed = _committed(mount / "out")
        assert 0 < len(committed) < rows // 500
        runs = run_records(mount / "out")
        assert [r["status"] for r in runs] in ([], ["failed"])  # recorded if there was room
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        again = _cli("run", str(spec), "-q")
        assert again.returncode == 0, again.stderr
        _assert_exactly_once(mount / "out", rows)
        after = _committed(mount / "out")
        for shard, entry in committed.items():  # what was committed stayed as it was
            assert after[shard]["run"] == entry["run"]


def test_disk_full_when_marking_success_is_one_line(tmp_path):
    """The last write of a run (`_SUCCESS`) meets a full disk: one line, no success marked;
    with room again, completing marks it."""
    from batch_infer.errors import OutputFailedError
    from batch_infer.sink.manifest import OutputSink, RunRecord, ShardEntry

    with _tmpfs(tmp_path / "small", "64k") as mount:
        sink = OutputSink(str(mount / "out"))
        sink.on_write_start("r1", {"a": 1}, {"s1": "fp"})
        entry = ShardEntry("s1", "f.parquet", 0, 3, 3, 3, 0, "fp", "sha", "r1")
        sink.write(entry, pa.table({"x": [1, 2, 3]}), None)
        filler = mount / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            f.write(b"\0" * (1 << 20))  # fill it up
        with pytest.raises(OutputFailedError) as err:
            sink.on_write_complete(RunRecord("r1", "job"), ["s1"], 0)
        assert "No space left on device while completing the output; free some space" in str(
            err.value
        )
        assert not (mount / "out" / "_SUCCESS").exists()
        filler.unlink()
        record = RunRecord("r1", "job")
        sink.on_write_complete(record, ["s1"], 0)
        assert record.status == "succeeded" and (mount / "out" / "_SUCCESS").exists()


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("sig", "actors"),
    [(signal.SIGTERM, None), (signal.SIGINT, None), (signal.SIGTERM, 2)],
    ids=["sigterm", "sigint", "sigterm-ray-actors"],
)
def test_sigterm_and_sigint_mid_run_are_recorded_as_interrupted_and_resume(tmp_path, sig, actors):
    """Also with Ray's actors (`num_actors`), whose commits in flight are counted."""
    rows = 24000
    data = _vectors(tmp_path / "in", files=4, rows=rows // 4)
    model = _heavy_model(tmp_path / "heavy.onnx")
    out = tmp_path / "out"
    spec = _spec(tmp_path, data, out, model, **({"num_actors": actors} if actors else {}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # SIGINT as a terminal's Ctrl-C reaches a command in the foreground: a test run in the
    # background of a non-interactive shell inherits SIGINT ignored, and Python keeps it so.
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch_infer.cli", "run", str(spec), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 180
    while len(_committed(out)) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no shard was committed in time"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: committed shards are kept" in err and "Traceback" not in err
    (record,) = run_records(out)
    assert record["status"] == "interrupted" and record["shards_committed"] < rows // 500
    assert record["shards_committed"] == len(_committed(out))
    again = _cli("run", str(spec), "-q")
    assert again.returncode == 0, again.stderr
    _assert_exactly_once(out, rows)


def test_two_runs_started_at_the_same_moment_one_refused_rows_once(tmp_path):
    rows = 12000
    data = _vectors(tmp_path / "in", files=2, rows=rows // 2)
    model = _heavy_model(tmp_path / "heavy.onnx")
    spec = _spec(tmp_path, data, tmp_path / "out", model)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "batch_infer.cli", "run", str(spec), "-q"]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**env, "PYTHONPATH": str(ROOT)})
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another batch-infer run is writing to this output" in refused
    _assert_exactly_once(tmp_path / "out", rows)


def test_raylet_killed_mid_run_is_one_line_exit_4_recorded_and_resumable(tmp_path):
    """Ray's own raylet dies under a run that uses Ray's actors: the run says so in one last
    line, exits 4, records itself, frees the output; the rerun finishes exactly once."""
    rows = 24000
    data = _vectors(tmp_path / "in", files=4, rows=rows // 4)
    model = _heavy_model(tmp_path / "heavy.onnx")
    out = tmp_path / "out"
    spec = _spec(tmp_path, data, out, model, num_actors=2)  # Ray's actors, not this process
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch_infer.cli", "run", str(spec), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**env, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while len(_committed(out)) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no shard was committed in time"
            time.sleep(0.05)
        found = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "raylet/raylet"],
                               capture_output=True, text=True).stdout.split()  # fmt: skip
        assert found, "the run's own raylet was not found"
        for pid in found:
            os.kill(int(pid), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in err, err
    if proc.returncode == 1:  # Ray's core worker ended the driver itself when it found the
        # raylet dead (docs/reliability.md): before the run was recorded, or just after
        assert all(r["status"] == "failed" for r in run_records(out))
    else:
        assert proc.returncode == 4, err
        last = [ln for ln in err.splitlines() if ln.strip()][-1]
        assert last.startswith("error: a Ray node of this run died") and "rerun" in last, err
        (record,) = run_records(out)
        assert record["status"] == "failed"
        assert record["shards_committed"] == len(_committed(out))
    again = _cli("run", str(spec), "-q")
    assert again.returncode == 0, again.stderr
    _assert_exactly_once(out, rows)


def _corrupt_a_data_page(path: Path) -> None:
    """Overwrite bytes inside the first column chunk's data, keeping the footer valid."""
    meta = pq.read_metadata(path)
    column = meta.row_group(0).column(1)
    start = column.data_page_offset + 40
    with path.open("r+b") as f:
        f.seek(start)
        f.write(bytes(range(256)) * 8)


@pytest.mark.parametrize("actors", [None, 2], ids=["this-process", "ray-actors"])
def test_a_corrupt_data_page_is_one_line_without_ray_tracebacks(tmp_path, actors):
    data = _vectors(tmp_path / "in", files=2, rows=1000)
    _corrupt_a_data_page(data / "f1.parquet")
    assert pq.read_metadata(data / "f1.parquet").num_rows == 1000  # the footer still reads
    model = _heavy_model(tmp_path / "heavy.onnx")
    spec = _spec(tmp_path, data, tmp_path / "out", model,
                 **({"num_actors": actors} if actors else {}))  # fmt: skip
    done = _cli("run", str(spec), "-q")
    assert done.returncode == 4, done.stderr
    assert "Unhandled error" not in done.stderr and "Traceback" not in done.stderr
    assert "f1.parquet" in done.stderr and "cannot read this parquet file" in done.stderr
    assert len(_committed(tmp_path / "out")) >= 2  # the good file's shards are kept
