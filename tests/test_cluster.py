"""Several nodes: a real two-node Ray cluster from `ray.cluster_utils.Cluster`."""

from __future__ import annotations

import json

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
    # enough work that the actor of the node that starts last still finds shards left
    data = write_parquet_dataset(tmp_path / "in", files=2, rows=1600, row_group=50)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=50, batch_size=10)
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

    data = write_parquet_dataset(tmp_path / "in", files=4, rows=1500, row_group=50)
    out = tmp_path / "out"
    spec = two_io_spec(data, out, models["two_io"], shard_rows=50, batch_size=10)
    shards = out / "_manifest" / "shards"
    worker = two_node_cluster.list_all_nodes()[1]
    removed: list[bool] = []

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
        removed.append(True)

    remover = threading.Thread(target=remove_the_worker)
    remover.start()
    summary = batch_infer.run(spec)
    remover.join()
    assert removed and summary.status == "succeeded" and summary.rows == 6000
    assert summary.retries >= 1  # what the lost node held was run again
    inputs = ds.dataset(str(data), format="parquet", partitioning="hive").to_table()
    assert_matches_direct(models["two_io"], inputs, read_output(out))
