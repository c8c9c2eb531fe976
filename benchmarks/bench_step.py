"""``moco bench step``: the MoCo training step against a supervised step on the same backbone.

MoCo costs ~4 forward-equivalents per image (query forward + backward, key forward) against
~3 for supervised training, so the ideal throughput ratio is ~0.75; the gap below it is our
overhead (momentum update, shuffling, queue, loss). Also times the momentum (EMA) update of
``moco_core.momentum_update`` against the official per-parameter loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_throughput, machine_info, median_milliseconds
from moco_core.encoders import Encoder, build_backbone
from moco_core.model import ModelConfig, build_model
from moco_core.momentum import make_momentum_copy, momentum_update
from moco_core.training import ComputeSettings, build_optimizer, compile_encoders, train_step


@torch.no_grad()
def _per_parameter_momentum_update(query_encoder: torch.nn.Module, momentum_encoder: torch.nn.Module, m: float) -> None:
    """The official implementation's loop, the baseline for the EMA timing."""
    for param_q, param_k in zip(query_encoder.parameters(), momentum_encoder.parameters()):
        param_k.data = param_k.data * m + param_q.data * (1.0 - m)


def _supervised_step(
    arch: str, small_image_stem: bool, images: torch.Tensor, settings: ComputeSettings, compile: bool = False
) -> Callable[[], None]:
    backbone, feature_dim = build_backbone(arch, small_image_stem)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(feature_dim, 1000)).to(images.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    labels = torch.randint(0, 1000, (images.shape[0],), device=images.device)

    def step() -> None:
        batch = settings.prepare(images)
        with settings.autocast(images.device):
            loss = F.cross_entropy(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _moco_step(
    config: ModelConfig, images: torch.Tensor, settings: ComputeSettings, compile: bool = False
) -> Callable[[], None]:
    model = build_model(config).to(images.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        compile_encoders(model)
    optimizer = build_optimizer(model)
    key_view = images.flip(0)

    def step() -> None:
        train_step(model, optimizer, images, key_view, lr=0.03, momentum=0.999, settings=settings)

    return step


def _ema_timings(archs: Sequence[str], device: torch.device, repeats: int = 20) -> dict:
    timings = {}
    for arch in archs:
        query = Encoder(arch, head="mlp").to(device)
        momentum = make_momentum_copy(query)
        fused = median_milliseconds(lambda q=query, k=momentum: momentum_update(q, k, 0.999), repeats, device)
        loop = median_milliseconds(
            lambda q=query, k=momentum: _per_parameter_momentum_update(q, k, 0.999), repeats, device
        )
        timings[arch] = {
            "foreach_ms": round(fused, 3),
            "per_parameter_loop_ms": round(loop, 3),
            "speedup": round(loop / fused, 2),
        }
    return timings


def run_step_benchmark(
    arch: str = "resnet18",
    image_size: int = 64,
    batch_size: int = 256,
    queue_sizes: Sequence[int] = (4096, 65536),
    batchnorm: str = "split",
    bn_splits: int = 8,
    small_image_stem: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    warmup: int = 2,
    steps: int = 3,
    rounds: int = 3,
    include_fp32: bool = True,
    ema_archs: Sequence[str] = ("resnet18", "resnet50"),
    compile: bool = False,
) -> dict:
    """Measure supervised vs MoCo training-step throughput (img/s) and EMA update time.

    All step functions are timed in interleaved rounds (median reported). The MoCo/supervised
    ``ratio`` uses the first queue size and the device's best settings (bf16 autocast +
    channels_last where supported); ``fp32`` repeats both without them. With ``compile`` both
    sides run under ``torch.compile`` (the supervised model; MoCo's encoders, as
    ``training.compile`` does), compilation in the warm-up steps.
    """
    if threads:
        torch.set_num_threads(threads)
    torch_device = torch.device(device)
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, device=torch_device)
    best = ComputeSettings.for_device(torch_device)
    precision = best.precision

    def moco_config(queue_size: int) -> ModelConfig:
        return ModelConfig(
            arch=arch,
            small_image_stem=small_image_stem,
            head="mlp",
            queue_size=queue_size,
            temperature=0.2,
            batchnorm=batchnorm,
            bn_splits=bn_splits,
        )  # type: ignore[arg-type]

    steps_by_name = {"supervised": _supervised_step(arch, small_image_stem, images, best, compile)}
    for k in queue_sizes:
        steps_by_name[f"moco_k{k}"] = _moco_step(moco_config(k), images, best, compile)
    if include_fp32:
        fp32 = ComputeSettings(autocast_dtype=None, channels_last=False)
        steps_by_name["supervised_fp32"] = _supervised_step(arch, small_image_stem, images, fp32)
        steps_by_name["moco_fp32"] = _moco_step(moco_config(queue_sizes[0]), images, fp32)
    throughput = interleaved_throughput(steps_by_name, batch_size, warmup, steps, rounds, torch_device, "bench step")

    supervised, moco = throughput["supervised"], throughput[f"moco_k{queue_sizes[0]}"]
    result: dict = {
        "benchmark": "step",
        "config": {
            "arch": arch,
            "image_size": image_size,
            "batch_size": batch_size,
            "batchnorm": batchnorm,
            "bn_splits": bn_splits,
            "small_image_stem": small_image_stem,
            "warmup": warmup,
            "steps": steps,
            "rounds": rounds,
            "compile": compile,
        },
        "machine": machine_info(torch_device),
        "settings": {"autocast_dtype": precision, "channels_last": best.channels_last},
        "supervised_img_per_s": round(supervised, 1),
        "moco_img_per_s": round(moco, 1),
        "moco_img_per_s_by_queue_size": {str(k): round(throughput[f"moco_k{k}"], 1) for k in queue_sizes},
        "ratio": round(moco / supervised, 3),
        "ideal_ratio_by_flops": 0.75,
    }
    if include_fp32:
        result["fp32"] = {
            "supervised_img_per_s": round(throughput["supervised_fp32"], 1),
            "moco_img_per_s": round(throughput["moco_fp32"], 1),
            "ratio": round(throughput["moco_fp32"] / throughput["supervised_fp32"], 3),
        }
    result["ema_update"] = _ema_timings(ema_archs, torch_device)
    return result
