import torch
import torch.nn.functional as F
from torch import nn

from moco_core.knn import extract_features, knn_predict, knn_top1


def _clusters(num_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(4, 16) * 5
    labels = torch.arange(4).repeat_interleave(num_per_class)
    points = centres[labels] + torch.randn(len(labels), 16, generator=generator) * 0.5
    return F.normalize(points, dim=1), labels


def test_knn_classifies_separable_clusters_perfectly():
    train_x, train_y = _clusters(50, 0)
    test_x, test_y = _clusters(20, 1)
    assert knn_top1(train_x, train_y, test_x, test_y, k=200, temperature=0.1, chunk_size=7) == 100.0


def test_knn_on_random_labels_is_near_chance():
    train_x, _ = _clusters(50, 0)
    test_x, _ = _clusters(50, 1)
    shuffled = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(3))
    test_y = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(4))
    assert knn_top1(train_x, shuffled, test_x, test_y, num_classes=4) < 50.0


def test_knn_predict_matches_explicit_weighted_vote():
    torch.manual_seed(5)
    bank = F.normalize(torch.randn(30, 8), dim=1)
    bank_labels = torch.randint(0, 3, (30,))
    queries = F.normalize(torch.randn(5, 8), dim=1)
    scores = knn_predict(queries, bank, bank_labels, num_classes=3, k=4, temperature=0.5)
    for i in range(5):
        similarity = bank @ queries[i]
        expected = torch.zeros(3)
        for j in similarity.argsort(descending=True)[:4]:
            expected[bank_labels[j]] += torch.exp(similarity[j] / 0.5)
        torch.testing.assert_close(scores[i], expected)


def test_extract_features_restores_training_mode_and_normalises():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6)).train()
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    features, labels = extract_features(model, batches)
    assert model.training
    assert features.shape == (12, 6) and labels.tolist() == [0, 1, 0, 1] * 3
    torch.testing.assert_close(features.norm(dim=1), torch.ones(12))
