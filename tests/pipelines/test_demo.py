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
