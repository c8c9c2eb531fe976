"""moco probe (full and cached), moco knn: end to end on tiny labelled shards, with MLflow."""

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moco_core.augment import RandomResizedCropTransform
from moco_core.encoders import build_backbone
from pipelines.cli import main
from pipelines.config import ConfigError
from pipelines.evaluate.knn import run_knn
from pipelines.evaluate.probe import ProbeFailed, run_probe
from pipelines.evaluate.probe_config import load_probe_config, resolve_view
from pipelines.evaluate.probe_worker import backbone_differences
from pipelines.ingest.shards import build_shards
from tests.pipelines.fixtures import jpeg_bytes, write_colour_classes

TINY = [
    "view.size=16",
    "optim.batch_size=12",
    "optim.lr=1",
    "optim.milestones=[8,9]",
    "training.precision=fp32",
    "cached.batch_size=32",
]


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory):
    """Three colour classes (36 training, 12 validation images each) and a random-init backbone."""
    root = tmp_path_factory.mktemp("probe_data")
    write_colour_classes(root / "train", {"red": 12, "green": 12, "blue": 12}, seed=0)
    write_colour_classes(root / "val", {"red": 4, "green": 4, "blue": 4}, seed=1)
    build_shards([root / "train"], root / "shards_train", row_group_size=6, workers=1, show_progress=False)
    build_shards([root / "val"], root / "shards_val", row_group_size=6, workers=1, show_progress=False)
    torch.manual_seed(0)
    module, _ = build_backbone("resnet18", small_image_stem=True)
    torch.save(module.state_dict(), root / "backbone.pth")
    return str(root / "backbone.pth"), str(root / "shards_train"), str(root / "shards_val")


def _live_object_refs(ray) -> set[str]:
    # issubclass(type(...)): isinstance would read every object's __class__, which warns for some of torch's.
    return {item.hex() for item in gc.get_objects() if issubclass(type(item), ray.ObjectRef)}


def _config(tmp_path, *extra):
    return load_probe_config("lincls", TINY + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra])


# ------------------------------------------------------------------------------ without Ray


def test_lincls_recipe_is_the_official_protocol():
    config = load_probe_config()
    linear = config.linear
    assert (linear.lr, linear.weight_decay, linear.epochs, linear.milestones, linear.batch_size) == (
        30.0,
        0.0,
        100,
        (60, 80),
        256,
    )
    assert config.view.train_scale == (0.08, 1.0)


def test_view_settings_come_from_the_pretraining_run_unless_given():
    config = load_probe_config()
    run = {"augment": {"size": 32, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}, "eval": {"crop_fraction": 1}}
    from_run = resolve_view(config, run)
    assert (from_run.size, from_run.crop_fraction, from_run.mean, from_run.source) == (
        32,
        1.0,
        (0.49, 0.48, 0.45),
        "run",
    )
    imagenet = resolve_view(config, None)
    assert (imagenet.size, imagenet.crop_fraction, imagenet.mean) == (224, 0.875, (0.485, 0.456, 0.406))
    given = resolve_view(load_probe_config(None, ["view.size=64", "view.crop_fraction=0.5"]), run)
    assert (given.size, given.crop_fraction) == (64, 0.5)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.milestones=[80,60]", "milestones"),
        ("view.crop_fraction=2", "view.crop_fraction"),
        ("model.arch=vit", "model.arch"),
    ],
)
def test_bad_probe_settings_are_one_line_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        load_probe_config(None, [override])


def test_training_view_is_a_seeded_random_resized_crop():
    transform = RandomResizedCropTransform(16, (0.08, 1.0))
    data = jpeg_bytes(3, size=(64, 48))
    first, _ = transform(data, np.random.default_rng(7))
    again, _ = transform(data, np.random.default_rng(7))
    other, _ = transform(data, np.random.default_rng(8))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_sanity_check_finds_any_changed_weight_or_statistic():
    module, _ = build_backbone("resnet18", small_image_stem=True)
    reference = {name: value.clone() for name, value in module.state_dict().items()}
    assert backbone_differences(module, reference) == []
    with torch.no_grad():
        module.layer2[0].bn1.running_mean[0] += 1e-6
    assert backbone_differences(module, reference) == ["layer2.0.bn1.running_mean"]


def test_a_feature_set_stacks_the_copies_of_the_images_that_have_all_of_them():
    from pipelines.evaluate.features import _Extracted, _feature_set

    def extracted(index, epoch, epochs, base):
        index, epoch = np.array(index), np.array(epoch)
        return _Extracted(base + index[:, None] + 0.0 * np.ones((1, 2)), index % 2, index, epoch, epochs)

    centre = extracted([0, 1, 2, 3], [0, 0, 0, 0], 1, 0.0)  # image 3 of 5 was not decodable
    copies = extracted([0, 1, 3, 0, 3], [0, 0, 0, 1, 1], 2, 100.0)  # copy 2 lacks image 1
    stacked, left_out = _feature_set(centre, copies, None, num_images=5)
    assert stacked.features.shape == (3, 2, 2) and left_out == 3  # images 0 and 3 have every view
    assert stacked.features[:, :, 0].tolist() == [[0.0, 3.0], [100.0, 103.0], [100.0, 103.0]]
    plain, left_out = _feature_set(centre, None, np.array([1, 0]), num_images=5)
    assert plain.labels.tolist() == [1, 0, 1, 0] and left_out == 1


# ------------------------------------------------------------------------------ with Ray


def test_cached_probe_learns_the_classes_tracks_mlflow_and_reuses_features(
    ray_cluster, colour_shards, tmp_path, capsys
):
    import mlflow

    backbone, train, val = colour_shards
    output = tmp_path / "cached"
    args = ["probe", "--backbone", backbone, "--train", train, "--val", val, "--output", str(output), "--json"]
    settings = [f"--set={item}" for item in TINY + ["optim.epochs=10", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]]
    assert main(args + settings) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "cached" and summary["top1"] >= 90.0 and summary["top5"] == 100.0
    assert summary["train_images"] == 36 and summary["val_images"] == 12 and summary["num_classes"] == 3
    assert len(summary["history"]) == 10 and summary["features_reused"] is False
    linear = torch.load(output / "linear.pt", weights_only=True)
    assert linear["weight"].shape == (3, 512) and linear["class_names"] == ["blue", "green", "red"]
    features = Path(summary["features"])
    assert np.load(features / "train_features.npy").shape == (36, 512)

    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "1.0"
    assert run.data.metrics["top1"] == pytest.approx(summary["top1"])
    assert len(client.get_metric_history(run.info.run_id, "val_top1")) == 10
    assert "linear.pt" in {item.path for item in client.list_artifacts(run.info.run_id)}

    # The same backbone and data again: the features are read back, not extracted.
    parent = client.create_run(run.info.experiment_id).info.run_id
    config = _config(tmp_path, "optim.epochs=10", f"tracking.parent_run_id={parent}")
    with pytest.raises(ConfigError, match=r"holds a finished probe \(top-1 .*pass --force to replace its results"):
        run_probe(backbone, [train], [val], str(output), config, "cached")
    assert json.loads((output / "summary.json").read_text()) == summary
    again = run_probe(backbone, [train], [val], str(output), config, "cached", force=True)
    assert again["features_reused"] is True and again["features"] == summary["features"]
    assert again["top1"] == summary["top1"]  # same features, same seed
    assert client.get_run(again["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent


def test_cached_probe_with_augmented_copies_and_knn_share_the_cache(ray_cluster, colour_shards, tmp_path):
    backbone, train, val = colour_shards
    refs_before = _live_object_refs(ray_cluster)
    copies = run_probe(
        backbone, [train], [val], str(tmp_path / "p"), _config(tmp_path, "optim.epochs=10", "cached.augmented_copies=2")
    )
    stacked = np.load(Path(copies["features"]) / "train_features.npy")
    assert stacked.shape == (3, 36, 512) and not np.allclose(stacked[1], stacked[2])
    assert copies["top1"] >= 80.0
    knn = run_knn(backbone, [train], [val], str(tmp_path / "p"), _config(tmp_path), k=10, temperature=0.1)
    assert knn["top1"] >= 90.0 and knn["bank_images"] == 36 and knn["query_images"] == 12
    assert knn["features_reused"] is False  # centre crops only: another key than with copies
    # Nothing of the extractions stays pinned in the object store (it would fill it over a sweep).
    assert _live_object_refs(ray_cluster) <= refs_before
    with pytest.raises(ConfigError, match="holds a kNN result"):
        run_knn(backbone, [train], [val], str(tmp_path / "p"), _config(tmp_path), k=10, temperature=0.1)
    knn_again = run_knn(
        backbone, [train], [val], str(tmp_path / "p"), _config(tmp_path), k=100, temperature=0.1, force=True
    )
    assert knn_again["k"] == 36  # no more neighbours than bank images
    assert knn_again["features_reused"] is True


def test_full_probe_resumes_and_agrees_with_cached(ray_cluster, colour_shards, tmp_path):
    backbone, train, val = colour_shards
    output = str(tmp_path / "full")
    scaling = ["scaling.workers=2", "scaling.cpus_per_worker=0.5", "training.eval_every_epochs=5"]
    first = run_probe(backbone, [train], [val], output, _config(tmp_path, "optim.epochs=3", *scaling), "full")
    assert first["sanity_check"] == "passed" and first["steps_per_epoch"] == 3 and len(first["history"]) == 3
    resumed = run_probe(backbone, [train], [val], output, _config(tmp_path, "optim.epochs=10", *scaling), "full", True)
    assert [record["epoch"] for record in resumed["history"]] == list(range(1, 11))
    assert resumed["history"][:3] == first["history"]  # restored, not retrained
    cached = run_probe(backbone, [train], [val], str(tmp_path / "c"), _config(tmp_path, "optim.epochs=10"))
    assert resumed["top1"] >= 90.0 and abs(resumed["top1"] - cached["top1"]) <= 10.0
    assert torch.load(Path(output) / "linear.pt", weights_only=True)["weight"].shape == (3, 512)
    # Finished: a resume with as many epochs says so at once; a new probe there is refused (it would
    # resume from these checkpoints).
    done = run_probe(backbone, [train], [val], output, _config(tmp_path, "optim.epochs=10", *scaling), "full", True)
    assert done["already_complete"] is True and done["history"] == resumed["history"]
    with pytest.raises(ConfigError, match="holds a finished full probe and its checkpoints; choose a new --output"):
        run_probe(backbone, [train], [val], output, _config(tmp_path, "optim.epochs=1", *scaling), "full")


def test_full_probe_fails_when_the_backbone_changes(ray_cluster, colour_shards, tmp_path):
    backbone, train, val = colour_shards
    config = _config(tmp_path, "optim.epochs=1", "debug.change_backbone_at_step=1", "scaling.cpus_per_worker=1")
    with pytest.raises(ProbeFailed, match="sanity check failed.*conv1.weight"):
        run_probe(backbone, [train], [val], str(tmp_path / "changed"), config, "full")


def test_unlabelled_data_is_refused_in_one_line(ray_cluster, colour_shards, tmp_path):
    backbone, train, _ = colour_shards
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(jpeg_bytes(1))
    with pytest.raises(ConfigError, match="--val: no labels"):
        run_probe(backbone, [train], [str(folder)], str(tmp_path / "o"), _config(tmp_path))
    with pytest.raises(ConfigError, match=f"--train: {tmp_path / 'nowhere'} does not exist"):
        run_probe(backbone, [str(tmp_path / "nowhere")], [train], str(tmp_path / "o2"), _config(tmp_path))
    # Shards of a flat folder have a label column, every label -1: caught once extracted.
    (folder / "y.jpg").write_bytes(jpeg_bytes(2))
    build_shards([folder], tmp_path / "flat_shards", workers=1, show_progress=False)
    with pytest.raises(ConfigError, match="--val: 2 of 2 images have no label"):
        run_knn(backbone, [train], [str(tmp_path / "flat_shards")], str(tmp_path / "k"), _config(tmp_path))


def test_resume_takes_no_inputs_of_its_own_and_only_a_full_probe_resumes(tmp_path, capsys):
    (tmp_path / "probe.json").write_text(json.dumps({"backbone": "b", "train": ["t"], "val": ["v"], "mode": "cached"}))
    (tmp_path / "config.yaml").write_text("{}")
    assert main(["probe", "--resume", str(tmp_path), "--backbone", "other.pt", "--mode", "full"]) == 1
    assert "leave out --backbone, --mode (--set overrides apply)" in capsys.readouterr().err
    assert main(["probe", "--resume", str(tmp_path)]) == 1
    assert f"{tmp_path} holds a cached probe; only a full probe resumes" in capsys.readouterr().err
    for command in ("probe", "knn"):
        argv = [command, "--backbone", "b.pt", "--train", "t", "--val", "v", "--output", str(tmp_path / "config.yaml")]
        assert main(argv) == 1
        assert (
            f"moco: error: --output {tmp_path / 'config.yaml'} is a file; give a directory" in capsys.readouterr().err
        )
