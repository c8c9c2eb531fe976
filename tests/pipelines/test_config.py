"""Recipes load, overrides apply, and every bad value is one line naming the key."""

import io

import numpy as np
import pytest
from PIL import Image

from moco_core.augment import IMAGENET_MEAN, IMAGENET_STD, PHOTOMETRIC_RECIPES, PhotometricRecipe
from pipelines.config import ConfigError, apply_overrides
from pipelines.evaluate.probe_config import load_probe_config
from pipelines.ingest.views import EvalViewFunction
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


def test_cifar_recipe_is_the_official_demo_point_by_point():
    """recipes/cifar-v2.yaml against the official CIFAR-10 demo's settings (REFERENCE: moco colab notebook)."""
    config = load_config("cifar-v2")
    model = config.model
    assert (model.arch, model.small_image_stem, model.head, model.dim) == ("resnet18", True, "linear", 128)
    assert (model.mechanism, model.queue_size, model.temperature, model.symmetric) == ("moco", 4096, 0.1, False)
    assert (model.batchnorm, model.bn_splits) == ("split", 8)
    assert (config.momentum.base, config.momentum.schedule) == (0.99, "constant")
    optim = config.optim
    assert (optim.batch_size, optim.lr, optim.scale_lr, optim.schedule) == (512, 0.06, False, "cosine")
    assert (optim.weight_decay, optim.sgd_momentum, optim.warmup_steps) == (5e-4, 0.9, 0)
    assert (config.training.epochs, config.training.total_steps) == (200, 0)
    for on_gpu in (False, True):
        augment = config.augment.resolve(on_gpu=on_gpu)
        assert (augment.size, augment.crop_scale, augment.crop_ratio) == (32, (0.08, 1.0), (3 / 4, 4 / 3))
        assert augment.mean == (0.4914, 0.4822, 0.4465) and augment.std == (0.2023, 0.1994, 0.2010)
        assert augment.photometric_recipe == PhotometricRecipe(
            jitter_strength=(0.4, 0.4, 0.4, 0.1),
            jitter_probability=0.8,
            grayscale_probability=0.2,
            grayscale_before_jitter=False,
            blur_probability=0.0,
            blur_sigma=PHOTOMETRIC_RECIPES["cifar"].blur_sigma,
        )
    evaluation = config.eval
    assert (evaluation.knn_k, evaluation.knn_temperature, evaluation.bank_size) == (200, 0.1, 50_000)
    assert (evaluation.image_size, evaluation.crop_fraction) == (32, 1.0)
    # The eval view of a 32 px test image is the image itself, as the demo's test_transform.
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    eval_view = EvalViewFunction(evaluation.image_size, crop_fraction=evaluation.crop_fraction)
    (view,), _ = eval_view(buffer.getvalue(), np.random.default_rng(0))
    assert np.array_equal(view, pixels)


@pytest.mark.parametrize("recipe", ["in1m-v1", "in1m-v2", "ig1b-v1", "demo"])
def test_other_recipes_keep_imagenet_statistics_and_the_standard_eval_crop(recipe):
    config = load_config(recipe)
    augment = config.augment.resolve(on_gpu=False)
    assert (augment.mean, augment.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert config.eval.crop_fraction == 0.875


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
        ("training.host_allocator=fast", "training.host_allocator='fast' is invalid"),
        ("augment.mean=[0.5, 0.5]", "augment.mean=[0.5, 0.5] is invalid: expected three finite values"),
        ("augment.std=[0.2, 0, 0.2]", "augment.std=[0.2, 0.0, 0.2] is invalid: expected three finite values > 0"),
        ("augment.std=0.2", "augment.std=0.2 is invalid: expected a list of float"),
        ("eval.crop_fraction=0", "eval.crop_fraction=0.0 is invalid: expected in (0, 1]"),
        ("eval.crop_fraction=1.5", "eval.crop_fraction=1.5 is invalid"),
        ("optim.lr", "not of the form key.sub=value"),
        ("training.epochs=-3", "training.epochs=-3.0 is invalid: expected >= 0"),
        ("eval.every_epochs=-1", "eval.every_epochs=-1 is invalid: expected >= 0"),
        ("eval.image_size=-5", "eval.image_size=-5 is invalid: expected >= 8, or 0"),
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


def test_the_trainer_trains_on_the_cpus_it_reserves_unless_told_otherwise():
    assert load_config("demo", ["scaling.cpus_per_worker=1"]).trainer_threads == 1
    assert load_config("demo", ["scaling.cpus_per_worker=1.5"]).trainer_threads == 2  # rounded up
    assert load_config("demo", ["scaling.cpus_per_worker=0.5"]).trainer_threads == 1
    assert load_config("demo", ["scaling.cpus_per_worker=0"]).trainer_threads == 1  # at least one
    assert load_config("demo", ["scaling.cpus_per_worker=8", "training.torch_threads=3"]).trainer_threads == 3
    assert load_probe_config("lincls", ["scaling.cpus_per_worker=1.5"]).trainer_threads == 2  # the probe alike
    assert load_probe_config("lincls", ["scaling.cpus_per_worker=4", "training.torch_threads=1"]).trainer_threads == 1


def test_a_recipe_that_is_not_valid_yaml_is_one_line_saying_where(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model: {arch: resnet18\n  bad: [\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(recipe))
    assert str(error.value) == f"{recipe} is not valid YAML: line 2, column 6: expected ',' or '}}', but got ':'"
