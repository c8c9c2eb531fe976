"""Reader lanes placed by resources: how many lanes and CPUs a run gets, and, on two Ray nodes on
this machine, lanes that run only where the ``ingest`` resource is, and a run that survives
losing a node after a checkpoint."""

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipelines.config import ConfigError
from pipelines.ingest.placement import ReaderLanes, reader_lanes
from pipelines.ingest.shards import build_shards
from pipelines.pretrain.config import load_config
from tests.pipelines.fixtures import TINY_PRETRAIN, write_image_folder
from tests.pipelines.test_pretrain import _trained_images


def _node(cpus: float, gpus: float = 0, **custom: float) -> dict:
    return {"Alive": True, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}}


def _lanes(nodes=(), readers=0, workers=2, trainer_cpus=1.0, gpus=False, cluster_cpus=4.0, **resources) -> ReaderLanes:
    return reader_lanes(
        readers=readers,
        workers=workers,
        trainer_cpus=trainer_cpus,
        trainer_uses_gpus=gpus,
        cluster_cpus=cluster_cpus,
        reader_resources=resources,
        nodes=nodes,
    )


def test_without_reader_resources_the_lanes_share_the_cpus_the_trainer_leaves():
    assert _lanes(cluster_cpus=2.0, workers=2, trainer_cpus=1.0) == ReaderLanes(1, 0.5, {})
    assert _lanes(cluster_cpus=16.0, workers=2, trainer_cpus=4.0) == ReaderLanes(6, 1.0, {})
    assert _lanes(cluster_cpus=16.0, workers=2, trainer_cpus=4.0, readers=4) == ReaderLanes(2, 1.0, {})


def test_pinned_lanes_count_the_cpus_of_the_nodes_that_carry_the_resource():
    # 8-GPU trainer nodes and two 64-CPU reader nodes: 128 lanes of one CPU, none on the GPU nodes.
    nodes = [_node(192, 8), _node(192, 8), _node(64, ingest=64), _node(64, ingest=64), _node(0)]
    assert _lanes(nodes, workers=16, trainer_cpus=128, gpus=True, ingest=1) == ReaderLanes(8, 1.0, {"ingest": 1})
    # A CPU trainer may land on the reader node: its CPUs are not the readers'.
    two = [_node(2), _node(3, ingest=2)]
    assert _lanes(two, workers=2, trainer_cpus=1.0, ingest=1) == ReaderLanes(1, 1.0, {"ingest": 1})
    # No more lanes than the resource admits at once.
    assert _lanes([_node(64, ingest=4)], workers=2, trainer_cpus=0, gpus=True, ingest=1).per_worker == 2
    dead = {"Alive": False, "Resources": {"CPU": 64, "ingest": 64}}
    assert _lanes([dead, _node(8, ingest=8)], workers=1, gpus=True, trainer_cpus=8, ingest=1).per_worker == 8


def test_pinned_lanes_before_reader_nodes_exist_need_data_readers():
    # An autoscaling cluster starts reader nodes when the lanes ask for them.
    assert _lanes([_node(0)], readers=96, workers=8, gpus=True, ingest=1) == ReaderLanes(12, 1.0, {"ingest": 1})
    with pytest.raises(ConfigError, match=r"no node of the cluster carries these resources yet.*data.readers"):
        _lanes([_node(0)], workers=8, gpus=True, ingest=1)
    with pytest.raises(ConfigError, match=r"run 1 reader lane\(s\) at once, and each of the 2 workers"):
        _lanes([_node(8, ingest=1)], workers=2, gpus=True, trainer_cpus=0, ingest=1)
    with pytest.raises(ConfigError, match="no CPU left for the readers"):
        _lanes([_node(1, ingest=1)], workers=1, trainer_cpus=1.0, ingest=1)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.reader_resources={CPU: 1}", "expected custom resources"),
        ("data.reader_resources={ingest: 0}", "expected custom resources"),
        ("data.reader_resources=ingest", "expected a mapping of str to float"),
        ("scaling.placement_strategy=RANDOM", "scaling.placement_strategy='RANDOM' is invalid"),
    ],
)
def test_bad_placement_settings_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_reader_resources_from_recipe_or_command_line():
    assert load_config("demo", ["data.reader_resources.ingest=1"]).data.reader_resources == {"ingest": 1.0}
    assert load_config("demo", ["data.reader_resources={ingest: 2}"]).data.reader_resources == {"ingest": 2.0}
    assert load_config("demo").data.reader_resources == {}


# ----------------------------------------------------------------------------- two Ray nodes


class _Run(threading.Thread):
    """``run_pretraining`` in a thread: the test's main thread adds and removes nodes meanwhile (a
    Ray node can only be started from the main thread)."""

    def __init__(self, *args):
        super().__init__(daemon=True)
        self.args = args
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from pipelines.pretrain.driver import run_pretraining

        try:
            self.summary = run_pretraining(*self.args)
        except BaseException as error:  # noqa: BLE001 -- reported by the test
            self.error = error


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _registered_step(run_dir: str) -> int | None:
    """The step of the newest checkpoint Ray Train's controller has registered (the one a restart
    resumes from), from its snapshot in the run directory; None before the first."""
    snapshot = Path(run_dir) / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or being replaced
        return None
    return latest["metrics"]["step"] if latest else None


def _train_worker_nodes() -> set[str]:
    """The nodes of the live Ray Train workers (from the GCS's actor table)."""
    from ray._private.state import actors

    return {
        actor["Address"]["NodeID"]
        for actor in actors().values()
        if actor["ActorClassName"].endswith("RayTrainWorker") and actor["State"] == "ALIVE"
    }


@pytest.fixture
def tiny_train(tmp_path):
    write_image_folder(tmp_path / "train", {"a": 16, "b": 16}, start_seed=0)
    build_shards([tmp_path / "train"], tmp_path / "shards", row_group_size=8, workers=1, show_progress=False)
    return str(tmp_path / "shards")


def test_two_nodes_readers_where_the_resource_is_and_recovery_from_a_lost_node(
    without_shared_ray, monkeypatch, tiny_train, tmp_path
):
    import ray
    from ray.cluster_utils import Cluster

    # Cluster() records its address where a plain ray.init() looks for a running cluster: in a
    # temp dir of its own, so that no other Ray user on this machine joins it by accident.
    ray_tmp = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    store = 100 * 1024 * 1024
    head_args = {"num_cpus": 2, "object_store_memory": store, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    reader_args = {"num_cpus": 3, "resources": {"ingest": 2}, "object_store_memory": store}
    reader_node = cluster.add_node(**reader_args)
    head_id, reader_id = cluster.head_node.node_id, reader_node.node_id
    run_dir = str(tmp_path / "run")
    config = load_config(
        "demo",
        [
            *TINY_PRETRAIN,
            "training.epochs=4",
            "data.reader_resources={ingest: 1}",
            "scaling.placement_strategy=SPREAD",
            "scaling.max_failures=1",
            "debug.record_batches=true",
            "tracking.enabled=false",
        ],
    )
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        run = _Run(config, [tiny_train], run_dir)
        run.start()
        # Once Ray Train has registered a checkpoint, lose the reader node (as a crash would), then
        # start a replacement with the same resources (as the autoscaler would).
        lost_after_step = _wait_for(lambda: _registered_step(run_dir), 600, "the first registered checkpoint")
        train_worker_nodes = _train_worker_nodes()
        cluster.remove_node(reader_node, allow_graceful=False)
        replacement_id = cluster.add_node(**reader_args).node_id
        run.join(timeout=900)
        assert not run.is_alive(), "the run did not finish after the node was replaced"
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.error is None, run.error
    summary = run.summary
    # A Ray Train worker on each node, the readers only where the resource is (the lost reader
    # node, then its replacement), never on the head.
    assert train_worker_nodes == {head_id, reader_id}
    assert set(summary["reader_nodes"]) == {reader_id, replacement_id}
    # Recovered from the checkpoint it had when the node went, and finished the run.
    assert summary["started_at_step"] >= lost_after_step >= 2 and summary["started_at_step"] % 2 == 0
    assert summary["steps"] == summary["total_steps"] == 4 * 4 and summary["images_seen"] == 16 * 8
    assert summary["queue_identical_across_workers"] is True
    # Each image once per epoch, as docs/PRETRAIN.md promises for a restart with the same layout.
    assert sorted(_trained_images(Path(run_dir))) == [(epoch, index) for epoch in range(4) for index in range(32)]
