"""The demo datasets are built offline, labelled, and sharded once."""

from pipelines.demo import build_demo_shards
from pipelines.ingest.planning import plan_collection


def test_photo_and_digit_demo_shards(tmp_path):
    train, val = build_demo_shards(tmp_path, "photos")
    train_collection, val_collection = plan_collection(train), plan_collection(val)
    photos = len(train_collection.class_names)
    assert photos >= 3  # scikit-learn's two and matplotlib's one at least
    assert train_collection.num_images == 150 * photos and val_collection.num_images == 30 * photos
    assert train_collection.class_names == val_collection.class_names
    assert build_demo_shards(tmp_path, "photos") == (train, val)  # reused, not rebuilt

    digits_train, digits_val = build_demo_shards(tmp_path, "digits")
    assert plan_collection(digits_train).num_images + plan_collection(digits_val).num_images == 1797
    assert plan_collection(digits_val).class_names == tuple(str(d) for d in range(10))


def test_random_init_baseline_is_the_runs_architecture_seeded():
    import torch

    from pipelines.demo import random_init_backbone
    from pipelines.evaluate.backbones import build_backbone_module
    from pipelines.pretrain.config import load_config

    config = load_config("demo")
    first, second = random_init_backbone(config), random_init_backbone(config)
    assert (first.arch, first.small_image_stem, first.kind) == ("resnet18", True, "random")
    assert all(torch.equal(first.state_dict[name], second.state_dict[name]) for name in first.state_dict)
    assert first.provenance["config"]["augment"]["size"] == 32  # the probe takes its view from the run
    build_backbone_module(first)  # loads strictly
