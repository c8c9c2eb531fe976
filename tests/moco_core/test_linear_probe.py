"""The linear classification protocol's classifier, optimiser, schedule and training loop."""

import pytest
import torch

from moco_core.linear_probe import (
    LinearProbeSettings,
    build_linear_classifier,
    evaluate_classifier,
    step_sums,
    topk_correct,
    train_linear_classifier,
)


def _separable(num_per_class: int, seed: int, classes: int = 4, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.arange(classes).repeat_interleave(num_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator) * 0.5, labels


SMALL = LinearProbeSettings(lr=0.5, epochs=12, milestones=(8, 10), batch_size=32)


def test_defaults_are_the_official_main_lincls_settings():
    settings = LinearProbeSettings()
    assert (settings.lr, settings.weight_decay, settings.sgd_momentum) == (30.0, 0.0, 0.9)
    assert (settings.epochs, settings.milestones, settings.gamma, settings.batch_size) == (100, (60, 80), 0.1, 256)


def test_classifier_starts_as_the_official_initialisation():
    torch.manual_seed(0)
    classifier = build_linear_classifier(2048, 1000)
    assert torch.count_nonzero(classifier.bias) == 0
    assert classifier.weight.mean().abs() < 1e-3 and classifier.weight.std().item() == pytest.approx(0.01, rel=0.02)


def test_lr_drops_tenfold_at_each_milestone_epoch():
    schedule = LinearProbeSettings().lr_schedule(steps_per_epoch=10)
    assert [schedule(step) for step in (0, 599, 600, 799, 800, 999)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])


def test_a_partial_last_batch_counts_as_a_step():
    assert LinearProbeSettings(batch_size=256).steps_per_epoch(1000) == 4


def test_separable_features_are_learnt_and_unrelated_labels_stay_at_chance():
    train_x, train_y = _separable(60, 0)
    val_x, val_y = _separable(40, 1)
    learnt = train_linear_classifier(train_x, train_y, val_x, val_y, 4, SMALL)
    assert learnt.final is not None and learnt.final.top1 >= 95.0
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(5))]
    chance = train_linear_classifier(train_x, shuffled, val_x, val_y, 4, SMALL)
    assert chance.final is not None and chance.final.top1 <= 45.0  # 25% expected, 160 val images


def test_history_has_every_epoch_and_validation_where_asked():
    train_x, train_y = _separable(20, 0)
    seen = []
    result = train_linear_classifier(
        train_x, train_y, train_x, train_y, 4, SMALL, eval_every_epochs=5, on_epoch=seen.append
    )
    assert [record.epoch for record in result.history] == list(range(12)) and seen == result.history
    assert [record.epoch for record in result.history if record.val is not None] == [4, 9, 11]


def test_augmented_copies_are_used_one_per_image_per_epoch():
    train_x, train_y = _separable(20, 0)
    copies = torch.stack([train_x, train_x + 0.01, train_x - 0.01])
    result = train_linear_classifier(copies, train_y, train_x, train_y, 4, SMALL)
    assert result.final is not None and result.final.top1 >= 95.0


def test_training_is_reproducible_with_a_seed():
    train_x, train_y = _separable(20, 0)
    first = train_linear_classifier(train_x, train_y, train_x, train_y, 4, SMALL)
    second = train_linear_classifier(train_x, train_y, train_x, train_y, 4, SMALL)
    assert torch.equal(first.classifier.weight, second.classifier.weight)


def test_topk_counts_and_caps_k_at_the_number_of_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == [1, 1, 3]


def test_evaluation_reports_percentages_and_mean_loss():
    classifier = build_linear_classifier(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(2) * 10)
    accuracy = evaluate_classifier(
        classifier, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])
    )
    assert accuracy.top1 == pytest.approx(200 / 3) and accuracy.top5 == 100.0 and accuracy.loss > 0


def test_invalid_settings_name_the_field():
    with pytest.raises(ValueError, match="milestones"):
        LinearProbeSettings(milestones=(80, 60)).validate()
    with pytest.raises(ValueError, match="lr=0"):
        LinearProbeSettings(lr=0).validate()


def test_step_sums_stay_on_the_device_and_match_the_host_figures():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5, (37,), generator=generator)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    sums = step_sums(loss, logits, labels)
    assert sums.dtype == torch.float64 and sums.device == logits.device and not sums.requires_grad
    expected = [loss.item() * 37, topk_correct(logits.detach(), labels, ks=(1,))[0], 37]
    assert sums.tolist() == pytest.approx(expected)
    assert 0 < sums[1] < 37  # neither all nor none right, so the count is really compared
