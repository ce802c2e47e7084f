"""Where a run's wall clock goes: the shard plan's taper and the timeline in `_runs/`."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batch_infer
from batch_infer.data.reading import open_dataset, read_rows
from batch_infer.data.sharding import TAPER, TAPER_MIN_BYTES, plan_shards
from batch_infer.sink.manifest import PHASES
from tests.conftest import ROOT, _save, read_output, run_records

WIDTH = 1 << 16  # 64 KiB per row: a few hundred rows make a shard worth tapering


def _images(root: Path, files: int = 3, rows: int = 600, group: int = 100) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        px = np.random.default_rng(i).integers(0, 256, (rows, WIDTH), dtype=np.uint8)
        col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(WIDTH), rows, [None, pa.py_buffer(px)])
        ids = np.arange(i * rows, (i + 1) * rows)
        pq.write_table(
            pa.table({"id": ids, "px": col}), root / f"f{i}.parquet", row_group_size=group,
            compression="none",
        )  # fmt: skip
    return root


def test_first_and_last_shards_taper_and_every_row_is_read_once(tmp_path):
    dataset = open_dataset(str(_images(tmp_path / "in")), "parquet")
    shards = plan_shards(dataset, None)
    assert shards == plan_shards(dataset, None)  # metadata alone: a rerun plans the same
    assert len({s.id for s in shards}) == len(shards)
    first, last = shards[: len(TAPER)], shards[-len(TAPER) :]
    whole = 600  # one file is one shard at this size

    def sizes(fractions: tuple[float, ...]) -> list[int]:
        bounds = [round(whole * sum(fractions[:k])) for k in range(len(fractions) + 1)]
        return [b - a for a, b in itertools.pairwise(bounds)]

    assert [s.rows for s in first] == sizes(TAPER) == [38, 37, 75, 150, 300]
    assert [s.rows for s in last] == sizes(TAPER[::-1])
    assert shards[len(TAPER)].rows == whole and shards[0].nbytes < TAPER_MIN_BYTES
    assert first[0].row_groups == (0,)  # a piece reads only the row groups it overlaps
    ids = []
    for s in shards:
        table = read_rows(dataset, s.file, ["id"], set(), s.row_groups, s.first_row,
                          s.row_start, s.row_stop)  # fmt: skip
        ids += table["id"].to_pylist()
    assert ids == list(range(1800))


def _model(path: Path) -> str:
    """px uint8[N, WIDTH] -> total int64[N]: the sum of a row's bytes."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["px"], ["wide"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["wide"], ["total"], keepdims=0, axes=[1]),
        ],
        "sum",
        [helper.make_tensor_value_info("px", TensorProto.UINT8, ["N", WIDTH])],
        [helper.make_tensor_value_info("total", TensorProto.INT64, ["N"])],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)


@pytest.mark.usefixtures("ray_start_regular")
def test_run_records_its_timeline_and_each_actors_lane(tmp_path):
    data = _images(tmp_path / "in")
    spec = {
        "name": "timeline",
        "input": {"path": str(data)},
        "model": {"onnx": _model(tmp_path / "sum.onnx"), "inputs": {"px": "px"}},
        "batch_size": 64,
        "output": {"path": str(tmp_path / "out"), "keep_columns": ["id"]},
    }
    record = batch_infer.run(spec)
    out = read_output(tmp_path / "out").sort_by("id")
    expect = np.concatenate(
        [np.random.default_rng(i).integers(0, 256, (600, WIDTH), dtype=np.uint8).sum(1)
         for i in range(3)]
    )  # fmt: skip
    assert out["id"].to_pylist() == list(range(1800))
    assert out["total"].to_numpy().tolist() == expect.tolist()

    (saved,) = run_records(tmp_path / "out")
    timeline = saved["timeline"]
    assert set(PHASES) <= set(timeline), timeline
    order = ["backend_ready", "first_batch", "first_commit", "last_commit", "finished"]
    assert [timeline[p] for p in order] == sorted(timeline[p] for p in order)
    assert timeline["ray_ready"] <= timeline["backend_ready"]
    assert 0 <= timeline["imported"] <= timeline["planned"] <= timeline["first_batch"]
    assert saved["nodes"] == [ray_node()] and record.nodes == saved["nodes"]
    lanes = saved["actor_stats"]
    assert [lane["actor"] for lane in lanes] == [0, 1]
    entries = [json.loads(p.read_text()) for p in (tmp_path / "out/_manifest/shards").glob("*")]
    worked = {e["actor"] for e in entries}  # shards go to loaded actors: one may load too late
    assert worked and worked <= {0, 1}
    for lane in lanes:
        if lane["actor"] not in worked:
            assert lane["first_batch_at"] is None and lane["busy_seconds"] == 0
            continue
        assert lane["loading_at"] <= lane["loaded_at"] <= lane["ready_at"] <= lane["first_batch_at"]
        assert lane["first_batch_at"] <= lane["last_batch_at"]
        assert lane["busy_seconds"] > 0 and 0 < lane["busy_while_running"] <= 1.0
    for e in entries:
        assert e["prepare_started"] <= e["infer_started"] <= e["committed_at"]

    from batch_infer.location import open_location
    from batch_infer.ops.timeline import write_timeline

    page = tmp_path / "run.html"
    write_timeline(open_location(str(tmp_path / "out"), "out"), str(page))
    text = page.read_text()
    assert text.count('class="infer"') == len(entries) == text.count('class="commit"')
    assert "actor 0" in text and "actor 1" in text and "first commit" in text
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")


def ray_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def test_summary_shows_the_timeline(tmp_path):
    """The CLI's summary names the phases, from the record alone."""
    from rich.console import Console

    from batch_infer.cli import _print_summary
    from batch_infer.sink.manifest import RunRecord

    record = RunRecord(run_id="r", name="n", rows_this_run=1000, seconds=4.0, started_at=0.0)
    record.timeline = {"ray_ready": 1.0, "planned": 0.5, "backend_ready": 2.0,
                       "first_batch": 2.1, "first_commit": 2.5, "last_batch": 3.1,
                       "last_commit": 3.2, "finished": 3.3}  # fmt: skip
    record.actor_stats = [{"actor": 0, "busy_seconds": 0.9, "busy_while_running": 0.9}]
    console = Console(record=True, width=200)
    _print_summary(console, record)
    text = console.export_text()
    assert "planned 0.5 s, ray ready 1.0 s, backend ready 2.0 s, first batch 2.1 s" in text
    assert "1,000 rows/s from first to last batch" in text and "90% from first" in text
    assert str(ROOT)  # the repository root is importable (tests.conftest)


def test_cli_run_starts_in_the_drivers_lane_while_its_ray_starts(tmp_path):
    """`batch-infer run` with its own Ray: the driver's lane loads the model and commits the
    first shards while Ray starts; whoever runs a shard, every row lands once."""
    import subprocess
    import sys

    import yaml

    data = _images(tmp_path / "in")
    spec = {
        "name": "lane",
        "input": {"path": str(data)},
        "model": {"onnx": _model(tmp_path / "sum.onnx"), "inputs": {"px": "px"}},
        "batch_size": 64,
        "output": {"path": str(tmp_path / "out"), "keep_columns": ["id"]},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", "run", str(tmp_path / "job.yaml"), "-q"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert read_output(tmp_path / "out").sort_by("id")["id"].to_pylist() == list(range(1800))
    (saved,) = run_records(tmp_path / "out")
    entries = [json.loads(p.read_text()) for p in (tmp_path / "out/_manifest/shards").glob("*")]
    first = min(entries, key=lambda e: e["committed_at"])
    assert first["actor"] == -1 and first["node"] == "driver"  # the lane's, before any actor
    lane = [a for a in saved["actor_stats"] if a["actor"] == -1]
    assert lane and lane[0]["busy_seconds"] > 0
    assert saved["timeline"]["first_commit"] < saved["timeline"].get("ray_ready", float("inf"))
    assert sum(e["rows"] for e in entries) == 1800

    inspect = [sys.executable, "-m", "batch_infer.cli", "inspect", str(tmp_path / "out")]
    shown = subprocess.run(inspect, capture_output=True, text=True, timeout=60, env=env)
    timeline = shown.stdout.split("last run's timeline (s after its start): ")[1]
    assert "planned" in timeline and "backend ready" in timeline, shown.stdout
    page = tmp_path / "run.html"
    drawn = subprocess.run([*inspect, "--timeline", str(page)], capture_output=True, text=True,
                           timeout=60, env=env)  # fmt: skip
    assert drawn.returncode == 0 and saved["run_id"] in drawn.stderr, drawn.stderr
    assert page.read_text().count('class="infer"') == len(entries)
    record = next((tmp_path / "out" / "_runs").glob("*.json"))
    record.write_text("{")  # cut short by hand: one line that names it
    drawn = subprocess.run([*inspect, "--timeline", str(page)], capture_output=True, text=True,
                           timeout=60, env=env)  # fmt: skip
    assert drawn.returncode == 2, drawn.stderr
    assert drawn.stderr.startswith(f"error: {record}: not a run record (")
    assert "Traceback" not in drawn.stderr


@pytest.mark.usefixtures("ray_start_regular")
def test_the_lane_hands_over_to_rays_actors_once_one_has_loaded(tmp_path):
    """What a GPU run does: its own lane starts at once; when an actor has loaded the model,
    the lane finishes the shards it holds and stops; the actors run the rest. Shown on the
    CPU with the driver's internals, since the handover is the same."""
    from batch_infer.job import _execute, _Lane, _Progress, _RayStart, _Work
    from batch_infer.planning import build_plan
    from batch_infer.sink.manifest import OutputSink, RunRecord
    from batch_infer.spec import resolve_spec

    data = _images(tmp_path / "in", files=6)
    spec = resolve_spec({
        "name": "handover",
        "input": {"path": str(data)},
        "model": {"onnx": _model(tmp_path / "sum.onnx"), "inputs": {"px": "px"}},
        "batch_size": 32,
        "shard_rows": 50,
        "output": {"path": str(tmp_path / "out"), "keep_columns": ["id"]},
    })  # fmt: skip
    plan = build_plan(spec)
    from batch_infer.data.sharding import plan_shards

    shards = plan_shards(plan.dataset, spec.shard_rows)
    sink = OutputSink(spec.output.path)
    record = RunRecord(run_id="handover", name="handover")
    sink.on_write_start(record.run_id, plan.config(), {s.id: s.fingerprint for s in shards})
    work = _Work(shards, record, _Progress("handover", len(shards), False))
    lane = _Lane(plan, sink, "cpu")
    lane.begin(work)
    _execute(plan, sink, work, lane, _RayStart(None), None)
    sink.on_write_complete(record, [s.id for s in shards], 0)
    sink.record_run(record)
    entries = [json.loads(p.read_text()) for p in (tmp_path / "out/_manifest/shards").glob("*")]
    by = {e["actor"] for e in entries}
    assert -1 in by and by - {-1}, by  # the lane, then the actors
    handed = min(e["committed_at"] for e in entries if e["actor"] >= 0)
    assert max(e["infer_started"] for e in entries if e["actor"] == -1) < handed
    assert read_output(tmp_path / "out").sort_by("id")["id"].to_pylist() == list(range(3600))


def _slow_to_warm(path: Path, width: int = 512, layers: int = 8) -> str:
    """x float[N, width] -> y float[N]: `layers` dense layers (4 MFLOP a row at 512), so
    that a warm-up on a large batch takes a while."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, last = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]))
        last = f"h{i}"
    nodes.append(helper.make_node("ReduceSum", [last], ["y"], keepdims=0, axes=[1]))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], weights,
    )  # fmt: skip
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)


def _lane_on_slow_model(tmp_path: Path, name: str, x: np.ndarray, batch_size: int) -> tuple:
    """A lane loading `_slow_to_warm` (its warm-up on `batch_size` rows of zeros), handed
    `x` as shards of 32 rows, as a run does: (lane, work, shards, record, sink, model)."""
    from batch_infer.data.sharding import plan_shards
    from batch_infer.job import _Lane, _Progress, _Work
    from batch_infer.planning import build_plan
    from batch_infer.sink.manifest import OutputSink, RunRecord
    from batch_infer.spec import resolve_spec

    (tmp_path / "in").mkdir()
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    ids = np.arange(len(x))
    pq.write_table(pa.table({"id": ids, "x": column}), tmp_path / "in" / "x.parquet")
    model = _slow_to_warm(tmp_path / "slow.onnx", width=x.shape[1])
    spec = resolve_spec({
        "name": name, "input": {"path": str(tmp_path / "in")},
        "model": {"onnx": model, "inputs": {"x": "x"}}, "batch_size": batch_size,
        "shard_rows": 32, "output": {"path": str(tmp_path / "out"), "keep_columns": ["id"]},
    })  # fmt: skip
    plan = build_plan(spec)
    sink = OutputSink(spec.output.path)
    lane = _Lane(plan, sink, "cpu")  # starts loading the model at once, as a run does
    shards = plan_shards(plan.dataset, spec.shard_rows)
    record = RunRecord(run_id=name, name=name)
    sink.on_write_start(record.run_id, plan.config(), {s.id: s.fingerprint for s in shards})
    work = _Work(shards, record, _Progress(name, len(shards), False))
    lane.begin(work)
    return lane, work, shards, record, sink, model


def test_the_lane_reads_its_first_shards_while_the_model_loads(tmp_path):
    """The run's own process reads (and decodes) its first shards as soon as they are
    planned, beside the model's load and warm-up, not after them: here a warm-up of a few
    tenths of a second (16,384 rows of zeros), and every shard read before it was ready."""
    from batch_infer.job import _execute

    x = np.random.default_rng(1).standard_normal((96, 512)).astype(np.float32)
    lane, work, shards, record, sink, model = _lane_on_slow_model(tmp_path, "early", x, 16384)
    _execute(lane.plan, sink, work, lane, None, None)
    assert lane.stats is not None and record.shards_committed == len(shards) == 3
    entries = [json.loads(p.read_text()) for p in (tmp_path / "out/_manifest/shards").glob("*")]
    assert max(e["prepare_started"] for e in entries) < lane.stats["ready_at"]
    assert min(e["infer_started"] for e in entries) >= lane.stats["ready_at"]
    got = read_output(tmp_path / "out").sort_by("id")
    assert got["id"].to_pylist() == list(range(96))
    import onnxruntime as ort

    want = ort.InferenceSession(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got["y"].to_numpy(), want, rtol=1e-5)


def test_a_stopped_lane_hands_back_what_it_read_ahead_at_once(tmp_path):
    """Stopped while its model still loads (an actor was ready first, or the run ended), the
    run's own process gives the shards it read ahead back to the queue at once, not after
    its load: Ray's actors get them now."""
    import time

    x = np.zeros((96, 512), np.float32)  # a warm-up on 65,536 rows: a second or more here
    lane, work, shards, record, sink, _ = _lane_on_slow_model(tmp_path, "handback", x, 65536)
    deadline = time.time() + 10
    while len(work.pending) == len(shards) and time.time() < deadline:
        time.sleep(0.001)  # until the lane has taken shards to read
    assert len(work.pending) < len(shards) and lane.running
    lane.stop()
    assert [s.id for s, _ in work.pending] == [s.id for s in shards]  # all back, in order
    lane.wait()
    assert record.shards_committed == 0 and len(work.pending) == len(shards)
    sink.on_write_failed(record, KeyboardInterrupt())
    sink.record_run(record)
