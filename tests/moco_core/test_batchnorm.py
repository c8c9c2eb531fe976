import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco_core import distributed
from moco_core.batchnorm import SplitBatchNorm2d, convert_batchnorm, encode_with_shuffled_batch
from tests.process_group import run_distributed


def test_split_bn_with_one_split_equals_plain_bn():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(6)
    split = SplitBatchNorm2d(6, num_splits=1)
    split.load_state_dict(plain.state_dict())
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    torch.testing.assert_close(split(x), plain(x))
    torch.testing.assert_close(split.running_mean, plain.running_mean)
    torch.testing.assert_close(split.running_var, plain.running_var)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_bn_normalises_each_sub_batch_with_its_own_statistics(memory_format):
    torch.manual_seed(1)
    splits, momentum = 4, 0.1
    layer = SplitBatchNorm2d(3, num_splits=splits, momentum=momentum)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1, 1)
    x = (torch.randn(16, 3, 4, 4) * torch.arange(1, 17).view(16, 1, 1, 1)).contiguous(memory_format=memory_format)
    expected_blocks, means, variances = [], [], []
    for block in x.chunk(splits):
        mean = block.mean(dim=(0, 2, 3))
        var = block.var(dim=(0, 2, 3), unbiased=False)
        normalised = (block - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps)
        expected_blocks.append(normalised * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))
        means.append(mean)
        variances.append(block.var(dim=(0, 2, 3), unbiased=True))
    out = layer(x)
    torch.testing.assert_close(out, torch.cat(expected_blocks), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_mean, momentum * torch.stack(means).mean(0))
    torch.testing.assert_close(layer.running_var, (1 - momentum) + momentum * torch.stack(variances).mean(0))
    layer.eval()  # eval mode is plain BN with the running statistics
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_bn_gradients_match_per_block_batchnorm(memory_format, dtype):
    torch.manual_seed(4)
    layer = SplitBatchNorm2d(5, num_splits=4)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
    reference_weight = layer.weight.detach().clone().requires_grad_()
    reference_bias = layer.bias.detach().clone().requires_grad_()
    x = torch.randn(16, 5, 3, 3).to(dtype).contiguous(memory_format=memory_format)
    x_split, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(16, 5, 3, 3).to(dtype)
    layer(x_split).backward(grad)
    blocks = [
        F.batch_norm(b, None, None, reference_weight, reference_bias, True, 0.1, layer.eps)
        for b in x_reference.chunk(4)
    ]
    torch.cat(blocks).backward(grad)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x_split.grad, x_reference.grad, **tolerance)
    torch.testing.assert_close(layer.weight.grad, reference_weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, reference_bias.grad, rtol=1e-4, atol=1e-4)
    assert x_split.grad.is_contiguous(memory_format=memory_format)


def test_split_bn_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="multiple of num_splits"):
        SplitBatchNorm2d(3, num_splits=4)(torch.randn(6, 3, 2, 2))


def test_convert_batchnorm_keeps_weights_and_state_dict_keys():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    net[1].running_mean.fill_(0.5)
    keys = set(net.state_dict())
    reference = copy.deepcopy(net).eval()
    converted = convert_batchnorm(net, "split", num_splits=2)
    assert isinstance(converted[1], SplitBatchNorm2d) and isinstance(converted[2][0], SplitBatchNorm2d)
    assert set(converted.state_dict()) == keys
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(converted.eval()(x), reference(x))
    with pytest.raises(ValueError, match="batchnorm mode"):
        convert_batchnorm(net, "bogus")  # type: ignore[arg-type]


def test_split_mode_encodes_a_locally_shuffled_batch_and_restores_order():
    torch.manual_seed(3)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), SplitBatchNorm2d(4, num_splits=2), nn.Flatten())
    images = torch.randn(8, 3, 5, 5)
    torch.manual_seed(10)
    encoded = encode_with_shuffled_batch(encoder, images, "split")
    torch.manual_seed(10)
    permutation = torch.randperm(8)
    expected = encoder(images[permutation])[torch.argsort(permutation)]
    torch.testing.assert_close(encoded, expected)


def _encoder() -> nn.Module:
    torch.manual_seed(0)  # identical weights on every rank
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def _local_images(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 3, 6, 6, generator=generator) * (1 + 2 * rank)


def _shuffle_bn_worker(train_mode: bool) -> dict:
    encoder = _encoder().train(train_mode)
    images = _local_images(distributed.rank())
    torch.manual_seed(1234)  # rank 0's draw is the permutation
    with torch.no_grad():
        shuffled = encode_with_shuffled_batch(encoder, images, "shuffle")
        unshuffled = encoder(images)
    return {"shuffled": shuffled, "unshuffled": unshuffled, "world": distributed.world_size()}


def test_shuffle_bn_in_eval_mode_equals_unshuffled_computation(tmp_path):
    results = run_distributed(_shuffle_bn_worker, tmp_path, False)
    for result in results:
        assert result["world"] == 2
        torch.testing.assert_close(result["shuffled"], result["unshuffled"], rtol=1e-5, atol=1e-6)


def test_shuffle_bn_in_train_mode_uses_statistics_of_the_shuffled_slice(tmp_path):
    results = run_distributed(_shuffle_bn_worker, tmp_path, True)
    # Per-process BN statistics now come from a cross-rank mix, not the local batch.
    for result in results:
        assert not torch.allclose(result["shuffled"], result["unshuffled"], atol=1e-3)
    # Reproduce exactly: gather, permute with rank 0's draw, encode each slice, un-permute.
    all_images = torch.cat([_local_images(0), _local_images(1)])
    torch.manual_seed(1234)
    permutation = torch.randperm(8)
    encoder = _encoder().train()
    with torch.no_grad():
        encoded = torch.cat([encoder(all_images[permutation[:4]]), encoder(all_images[permutation[4:]])])
    expected = encoded[torch.argsort(permutation)]
    torch.testing.assert_close(torch.cat([r["shuffled"] for r in results]), expected, rtol=1e-4, atol=1e-5)


def test_single_process_collectives_are_identities():
    x = torch.randn(3, 2)
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_gather_concat(x) is x
    assert distributed.all_gather_concat_with_grad(x) is x
    torch.testing.assert_close(distributed.all_reduce_mean(x), x)


def test_auto_mode_is_split_in_one_process_and_shuffle_in_a_group(tmp_path):
    from moco_core.batchnorm import resolve_batchnorm_mode

    assert resolve_batchnorm_mode("auto") == "split"
    assert resolve_batchnorm_mode("none") == "none"
    assert run_distributed(_resolved_mode, tmp_path) == ["shuffle", "shuffle"]


def _resolved_mode() -> str:
    from moco_core.batchnorm import resolve_batchnorm_mode

    return resolve_batchnorm_mode("auto")


@pytest.mark.parametrize("form", ["out= blocks (CPU)", "batched (other devices, compiled)"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_split_bn_form_agrees_with_the_per_block_reference(form, memory_format, dtype):
    """Output, running statistics, every gradient and the memory format, against per-block
    F.batch_norm + cat (whose running statistics are averaged over the blocks, as the layer does)."""
    from moco_core.batchnorm import _split_batch_norm_batched, _split_batch_norm_by_blocks, _SplitBatchNormFunction

    torch.manual_seed(6)
    x = (torch.randn(12, 4, 5, 3) * 3 + 1).to(dtype).contiguous(memory_format=memory_format)
    weight, bias = torch.rand(4) + 0.5, torch.randn(4)
    grad = torch.randn(12, 4, 5, 3).to(dtype) * torch.arange(12.0).view(12, 1, 1, 1).to(dtype)
    batched = form.startswith("batched")
    results = []
    for function in (
        _split_batch_norm_batched if batched else _SplitBatchNormFunction.apply,
        _split_batch_norm_by_blocks,
    ):
        inputs = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        per_layer = batched and function is _split_batch_norm_batched
        means, variances = (torch.zeros(4), torch.ones(4)) if per_layer else (torch.zeros(3, 4), torch.ones(3, 4))
        output = function(*inputs, means, variances, 0.1, 1e-5, 3)
        output.backward(grad)
        assert output.dtype == dtype and output.is_contiguous(memory_format=memory_format)
        if means.ndim == 2:
            means, variances = means.mean(dim=0), variances.mean(dim=0)
        results.append([output, means, variances] + [tensor.grad for tensor in inputs])
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for mine, reference in zip(*results):
        torch.testing.assert_close(mine.float(), reference.float(), **tolerance)
