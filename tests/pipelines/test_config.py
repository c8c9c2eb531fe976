"""Recipes load, overrides apply, and every bad value is one line naming the key."""

import pytest

from pipelines.config import ConfigError, apply_overrides
from pipelines.pretrain.config import load_config, plan_steps


@pytest.mark.parametrize("recipe", ["in1m-v1", "in1m-v2", "ig1b-v1", "cifar-v2", "demo"])
def test_every_recipe_loads_and_validates(recipe):
    config = load_config(recipe)
    assert config.optim.batch_size % config.scaling.workers == 0


def test_recipes_hold_the_paper_settings():
    ig = load_config("ig1b-v1")
    assert (ig.optim.batch_size, ig.optim.lr, ig.optim.schedule, ig.optim.gamma) == (1024, 0.12, "exponential", 0.9)
    assert ig.optim.decay_every_steps == 62_500 and ig.training.total_steps == 1_250_000
    cifar = load_config("cifar-v2")
    assert (cifar.model.queue_size, cifar.momentum.base, cifar.model.temperature, cifar.optim.weight_decay) == (
        4096,
        0.99,
        0.1,
        5e-4,
    )
    assert cifar.model.small_image_stem and cifar.model.bn_splits == 8 and cifar.optim.lr == 0.06
    v1 = load_config("in1m-v1")
    assert v1.model.head == "linear" and v1.optim.milestones == (120.0, 160.0) and v1.model.temperature == 0.07


def test_overrides_parse_yaml_values_and_scientific_notation():
    config = load_config(
        "demo",
        [
            "optim.lr=1e-4",
            "optim.milestones=[10, 20]",
            "data.shuffle=false",
            "tracking.run_name=null",
            "model.arch=resnet34",
        ],
    )
    assert config.optim.lr == 1e-4 and config.optim.milestones == (10.0, 20.0)
    assert config.data.shuffle is False and config.tracking.run_name is None and config.model.arch == "resnet34"
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=0.1", "unknown key optim.lrr"),
        ("nonsense.key=1", "unknown key nonsense"),
        ("optim.batch_size=abc", "optim.batch_size='abc' is invalid: expected int"),
        ("model.batchnorm=magic", "model.batchnorm='magic' is invalid"),
        ("momentum.base=1.5", "momentum.base=1.5 is invalid"),
        ("scaling.workers=3", "multiple of scaling.workers=3"),
        ("model.batchnorm=shuffle", "needs scaling.workers > 1"),
        ("augment.crop_scale=[0.9, 0.1]", "augment.crop_scale"),
        ("augment.blur=box", "augment.blur='box' is invalid"),
        ("optim.lr", "not of the form key.sub=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("demo", [override])


def test_photometric_placement_and_blur_resolve_together():
    assert load_config("demo").augment.resolve(on_gpu=True).photometric == "device"
    assert load_config("demo").augment.resolve(on_gpu=False).photometric == "cpu"
    official_blur = load_config("demo", ["augment.blur=pil"]).augment
    assert official_blur.resolve(on_gpu=True) == official_blur.resolve(on_gpu=False)
    assert (official_blur.resolve(on_gpu=True).photometric, official_blur.resolve(on_gpu=True).blur) == ("cpu", "pil")
    with pytest.raises(ConfigError, match="augment.blur='pil' is invalid: expected gaussian when photometric"):
        load_config("demo", ["augment.blur=pil", "augment.photometric=device"])


def test_iteration_based_and_epoch_based_step_planning():
    assert plan_steps(load_config("demo"), 1437) == (11, 88)
    assert plan_steps(load_config("ig1b-v1"), 10_000_000)[1] == 1_250_000
    with pytest.raises(ConfigError, match="larger than the training data"):
        plan_steps(load_config("demo"), 100)
