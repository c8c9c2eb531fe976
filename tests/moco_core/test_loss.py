import math

import pytest
import torch
import torch.nn.functional as F

from moco_core.loss import in_batch_info_nce, info_nce


def _reference_info_nce(query, positive, negatives, temperature):
    """Explicit per-query loop: -log softmax of the positive among [positive, negatives]."""
    losses, top1, top5 = [], 0, 0
    for i in range(query.shape[0]):
        logits = [float(query[i] @ positive[i]) / temperature]
        logits += [float(query[i] @ negatives[j]) / temperature for j in range(negatives.shape[0])]
        log_denominator = math.log(sum(math.exp(v) for v in logits))
        losses.append(log_denominator - logits[0])
        place = sorted(logits, reverse=True).index(logits[0])
        top1 += place < 1
        top5 += place < 5
    count = query.shape[0]
    return sum(losses) / count, 100.0 * top1 / count, 100.0 * top5 / count


@pytest.mark.parametrize("batch,num_negatives,dim", [(1, 1, 2), (4, 7, 3), (8, 33, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_explicit_loop(batch, num_negatives, dim, dtype, temperature):
    torch.manual_seed(batch * 100 + num_negatives)
    query = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=1)
    positive = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=1)
    negatives = F.normalize(torch.randn(num_negatives, dim, dtype=dtype), dim=1)
    result = info_nce(query, positive, negatives, temperature)
    expected_loss, expected_top1, expected_top5 = _reference_info_nce(query, positive, negatives, temperature)
    assert result.loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-5)
    assert result.pretext_top1.item() == pytest.approx(expected_top1)
    assert result.pretext_top5.item() == pytest.approx(expected_top5)
    assert result.loss.dtype == dtype


def test_info_nce_random_level_is_log_k_plus_one():
    # Identical vectors everywhere: every logit equal, so the loss is exactly ln(K + 1).
    query = torch.ones(5, 4) / 2
    negatives = torch.ones(99, 4) / 2
    assert info_nce(query, query, negatives, 0.2).loss.item() == pytest.approx(math.log(100), rel=1e-6)


def test_info_nce_gradient_equals_autograd_through_the_plain_formula():
    # The custom backward against autograd through cross entropy on explicit logits.
    torch.manual_seed(2)
    query = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    positive = F.normalize(torch.randn(4, 8), dim=1)
    negatives = F.normalize(torch.randn(16, 8), dim=1)
    info_nce(query, positive, negatives, 0.07).loss.backward()
    reference_query = query.detach().clone().requires_grad_()
    logits = torch.cat([(reference_query * positive).sum(1, keepdim=True), reference_query @ negatives.T], 1) / 0.07
    F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).backward()
    torch.testing.assert_close(query.grad, reference_query.grad, rtol=1e-5, atol=1e-6)


def test_info_nce_rejects_non_positive_temperature():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(x, x, x, 0.0)


@pytest.mark.parametrize("batch,extra,offset", [(3, 0, 0), (4, 4, 4), (2, 6, 2)])
def test_in_batch_info_nce_matches_explicit_loop(batch, extra, offset):
    torch.manual_seed(7)
    query = F.normalize(torch.randn(batch, 5, dtype=torch.float64), dim=1)
    keys = F.normalize(torch.randn(batch + extra, 5, dtype=torch.float64), dim=1)
    result = in_batch_info_nce(query, keys, 0.1, first_positive=offset)
    losses = []
    for i in range(batch):
        logits = [float(query[i] @ keys[j]) / 0.1 for j in range(keys.shape[0])]
        losses.append(math.log(sum(math.exp(v) for v in logits)) - logits[offset + i])
    assert result.loss.item() == pytest.approx(sum(losses) / batch, rel=1e-9)


def test_info_nce_under_bf16_autocast_matches_fp32():
    torch.manual_seed(3)
    query = F.normalize(torch.randn(16, 32), dim=1)
    positive = F.normalize(query + 0.1 * torch.randn(16, 32), dim=1)
    negatives = F.normalize(torch.randn(4096, 32), dim=1)
    reference = info_nce(query, positive, negatives, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = info_nce(query.bfloat16(), positive.bfloat16(), negatives, 0.07)
    assert mixed.loss.dtype == torch.float32
    assert mixed.loss.item() == pytest.approx(reference.loss.item(), rel=2e-2)


def test_pretext_accuracy_counts_ties_and_places():
    # Positive 1.0; negatives put it first, third and sixth for the three queries.
    query = torch.eye(3, 8)
    positive = torch.eye(3, 8)
    negatives = torch.zeros(6, 8)
    negatives[:2, 1] = 2.0  # query 1: two negatives above
    negatives[:, 2] = 2.0  # query 2: six negatives above
    result = info_nce(query, positive, negatives, 1.0)
    assert result.pretext_top1.item() == pytest.approx(100 / 3)
    assert result.pretext_top5.item() == pytest.approx(200 / 3)


@pytest.mark.parametrize("num_negatives", [1, 3, 40])
def test_info_nce_gradient_matches_finite_differences(num_negatives):
    torch.manual_seed(num_negatives)
    query = F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=1).requires_grad_()
    positive = F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=1)
    negatives = F.normalize(torch.randn(num_negatives, 6, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda q: info_nce(q, positive, negatives, 0.1).loss, (query,))


def test_info_nce_refuses_keys_that_require_grad():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient"):
        info_nce(x, x, x.detach(), 0.2)
