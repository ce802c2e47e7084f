"""Several nodes: a real two-node Ray cluster from `ray.cluster_utils.Cluster`."""

from __future__ import annotations

import json
import re

import pyarrow.dataset as ds
import pytest
import ray
from ray.cluster_utils import Cluster

import batch_infer
from tests.conftest import assert_matches_direct, read_output, two_io_spec, write_parquet_dataset


@pytest.fixture
def two_node_cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_shards_spread_over_both_nodes(two_node_cluster, tmp_path, models):
    # enough work that the actor of the node that starts last still finds shards left, also
    # on a loaded CI machine (batches of 10 rows: it found none once in a full suite run)
    data = write_parquet_dataset(tmp_path / "in", files=2, rows=1600, row_group=50)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=50, batch_size=2)
    summary = batch_infer.run(spec)
    assert summary.actors == 2
    entries = [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]
    nodes = {e["node"] for e in entries}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    inputs = ds.dataset(str(data), format="parquet", partitioning="hive").to_table()
    assert_matches_direct(models["two_io"], inputs, read_output(out))


def test_a_node_removed_mid_run_its_shards_rerun_elsewhere(two_node_cluster, tmp_path, models):
    """A worker node leaves (its raylet and workers die) mid-run: the run goes on, on the
    head, and every row lands once."""
    import threading
    import time

    # 240 shards: the worker's actor starts seconds after the head's, and with 120 its first
    # commit once came so late that it held nothing more when removed (no retry to see).
    data = write_parquet_dataset(tmp_path / "in", files=4, rows=3000, row_group=50)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=50, batch_size=10)
    shards = out / "_manifest" / "shards"
    worker = two_node_cluster.list_all_nodes()[1]
    removed: list[int] = []  # shards committed when the worker went

    def worker_committed() -> bool:
        nodes = (json.loads(p.read_text())["node"] for p in shards.glob("*.json"))
        return worker.node_id in nodes

    def remove_the_worker() -> None:
        # Once the worker's actor has committed a shard it is running more (two at once and
        # one waiting); before that it may hold nothing, and nothing would be lost.
        deadline = time.time() + 120
        while time.time() < deadline and not worker_committed():
            time.sleep(0.02)
        two_node_cluster.remove_node(worker, allow_graceful=False)
        removed.append(len(list(shards.glob("*.json"))))

    remover = threading.Thread(target=remove_the_worker)
    remover.start()
    summary = batch_infer.run(spec)
    remover.join()
    assert removed and summary.status == "succeeded" and summary.rows == 12000
    assert summary.retries >= 1, removed  # what the lost node held was run again
    inputs = ds.dataset(str(data), format="parquet", partitioning="hive").to_table()
    assert_matches_direct(models["two_io"], inputs, read_output(out))


def test_a_run_that_waits_for_resources_says_for_what(tmp_path, models):
    """A cluster whose nodes have no CPU for the actors (held by other jobs, say): Ray waits,
    and its own warnings do not reach the driver, so the run says what it waits for and
    what Ray has free; Ctrl-C then ends it as always."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import ROOT

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        data = write_parquet_dataset(tmp_path / "in", files=1, rows=200, row_group=50)
        spec = tmp_path / "spec.yaml"
        doc = two_io_spec(data, tmp_path / "out", models["two_io"], shard_rows=50)
        spec.write_text(yaml.safe_dump(doc))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= {"PYTHONPATH": str(ROOT), "BATCH_INFER_STALL_NOTICE_SECONDS": "3"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "batch_infer.cli", "run", str(spec), "-q",
             "--address", cluster.address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        assert proc.stderr is not None
        deadline, lines = time.time() + 120, []
        while not any("nothing has finished" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            lines.append(proc.stderr.readline())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        notice = next(line for line in lines if "nothing has finished" in line)
        # (on a loaded machine the shards may still be being read too: said first, with a ";")
        assert re.search(
            r"[:;] 1 of 1 actor\(s\) not running the model yet \(each needs 1 CPU\)\.", notice
        )
        assert "Ray has free: CPU 0 of 0" not in notice  # the head has no CPU resource at all
        assert "Ray has free: nothing (its nodes offer no CPU or GPU)" in notice
        assert proc.returncode == 130, err
        assert "interrupted: committed shards are kept" in err
    finally:
        cluster.shutdown()
