"""Every GPU figure the GPU-speed work needs, in one prepared run for a session lent a GPU.

The GPU machine has torch, torchvision, pillow and scikit-image but no Ray, MLflow or PyYAML, so
this runs ``moco bench step``'s code (no Ray) and ``moco_core`` directly. Sections run in order
of importance while ``--budget`` seconds last, and ``OUT_DIR/gpu_session.json`` is rewritten after
each, so a run cut short keeps what finished:

* ``step_*``: MoCo against supervised training steps (bf16, channels_last) on ResNet-50 at 224 px
  (batch 256, K 65,536) and on ResNet-18 with the CIFAR stem at 32 px (batch 512, K 4,096), with
  split BN (one pass on a GPU), plain BN, Shuffling BN's single-process path, and with both
  sides compiled (``--compile``; ResNet-50 compiles for over a minute);
* ``host_syncs``: three MoCo steps (ResNet-18, 32 px, batch 256, the device photometric path,
  split BN, the queue) under CUDA's sync debug mode, after a first step: every place the step
  waits for the GPU, by source line (none expected; CUDA only);
* ``feed``: what the readers must deliver: our per-image path at 224 px with the photometric
  part on the device, in images/s on one CPU core, and the GPU time of the batched photometric
  part per batch of 256; ``reader_cores_per_gpu`` = the MoCo step's img/s / that rate.

Usage: ``python -m benchmarks.gpu_session OUT_DIR [--budget S] [--quick]`` from the project root
(``--quick``: tiny sizes on whatever device there is, a dry run on a CPU machine).
"""

from __future__ import annotations

import argparse
import io
import json
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_step import run_step_benchmark
from benchmarks.common import median_milliseconds


def _step_cases(quick: bool, device: str) -> dict[str, dict]:
    """name -> run_step_benchmark arguments, most important first."""
    r50 = dict(arch="resnet50", image_size=224, batch_size=256, queue_sizes=(65536,))
    r18 = dict(arch="resnet18", image_size=32, batch_size=512, queue_sizes=(4096,), small_image_stem=True)
    if quick:
        r50 = dict(arch="resnet18", image_size=32, batch_size=16, queue_sizes=(64,))
        r18 = dict(r50, small_image_stem=True)
    timing = dict(warmup=1, steps=1, rounds=1) if quick else dict(warmup=3, steps=5, rounds=3)
    common = dict(device=device, include_fp32=False, ema_archs=(), **timing)
    return {
        "step_r50_split": dict(r50, batchnorm="split", **common),
        "step_r50_none": dict(r50, batchnorm="none", **common),
        "step_r18_cifar_split": dict(r18, batchnorm="split", **common),
        "step_r18_cifar_none": dict(r18, batchnorm="none", **common),
        "step_r50_shuffle": dict(r50, batchnorm="shuffle", **common),
        "step_r50_split_compiled": dict(r50, batchnorm="split", compile=True, **common),
        "step_r18_cifar_split_compiled": dict(r18, batchnorm="split", compile=True, **common),
    }


def host_syncs(device: str) -> dict:
    """Where a warm MoCo step (device photometric path, split BN, queue) waits for the GPU: CUDA's
    sync debug mode warns at each such call; counted by the source line that made it."""
    if device != "cuda":
        return {"skipped": "CUDA only"}
    from moco_core.augment import AugmentConfig
    from moco_core.model import ModelConfig, build_model
    from moco_core.photometric import prepare_model_input
    from moco_core.training import ComputeSettings, build_optimizer, train_step

    config = AugmentConfig(recipe="v2", size=32, photometric="device")
    model = build_model(ModelConfig(arch="resnet18", small_image_stem=True, queue_size=4096, batchnorm="split"))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model)
    settings = ComputeSettings(torch.bfloat16, channels_last=True)
    views = torch.randint(0, 256, (2, 256, 32, 32, 3), dtype=torch.uint8).pin_memory()
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        query, key = (prepare_model_input(views[i].to(device, non_blocking=True), config, generator) for i in (0, 1))
        train_step(model, optimizer, query, key, lr=0.03, momentum=0.999, settings=settings)

    step()  # the first step initialises lazily (cuDNN, the optimizer's state)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = Counter(f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:80]}" for w in caught)
    return {"steps": 3, "syncs": sum(places.values()), "by_place": dict(places.most_common(20))}


def _sample_jpegs(count: int) -> list[bytes]:
    """~500x375 JPEGs cropped from scikit-image's sample photos (no download)."""
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea")]
    rng = np.random.default_rng(0)
    encoded = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = photo.size
        left, top = int(rng.integers(0, width // 4)), int(rng.integers(0, height // 4))
        view = photo.resize((500, 375), box=(left, top, left + 3 * width // 4, top + 3 * height // 4))
        buffer = io.BytesIO()
        view.save(buffer, format="JPEG", quality=92)
        encoded.append(buffer.getvalue())
    return encoded


def feed_rate(device: str, quick: bool, step_img_per_s: float | None) -> dict:
    """Per-image path (decode + crops + flips) per CPU core, and the batched photometric part's
    GPU time per batch of 256, at 224 px."""
    from moco_core.augment import AugmentConfig
    from moco_core.photometric import prepare_model_input
    from pipelines.ingest.views import TwoViewFunction

    size, batch = (32, 16) if quick else (224, 256)
    config = AugmentConfig(recipe="v2", size=size, photometric="device")
    views = TwoViewFunction(config)
    images = _sample_jpegs(20 if quick else 300)
    rng = np.random.default_rng(0)
    views(images[0], rng)
    start = time.perf_counter()
    for data in images:
        views(data, rng)
    per_core = len(images) / (time.perf_counter() - start)
    batch_views = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    generator = torch.Generator().manual_seed(0)  # parameters are drawn on the CPU
    photometric_ms = median_milliseconds(
        lambda: prepare_model_input(batch_views, config, generator), 5, torch.device(device)
    )
    result = {
        "size": size,
        "per_image_img_per_s_per_core": round(per_core, 1),
        "photometric_ms_per_batch": round(photometric_ms, 3),
        "batch": batch,
    }
    if step_img_per_s:
        result["reader_cores_per_gpu"] = round(step_img_per_s / per_core, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds; no new section starts after it")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on any device (dry run)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    started = time.time()

    def section(name: str, measure: Callable[[], dict]) -> None:
        if time.time() - started > args.budget:
            results[name] = {"skipped": "budget"}
        else:
            began = time.time()
            try:
                results[name] = measure()
            except Exception:  # noqa: BLE001 - one failed section must not lose the others
                results[name] = {"error": traceback.format_exc()[-3000:]}
            results[f"{name}_s"] = round(time.time() - began, 1)
            print(f"== {name} ({results[f'{name}_s']} s): {json.dumps(results[name])[:600]}", flush=True)
        (out / "gpu_session.json").write_text(json.dumps(results, indent=1))

    section("host_syncs", lambda: host_syncs(device))
    cases = _step_cases(args.quick, device)
    for name in list(cases)[:4]:
        section(name, lambda case=cases[name]: run_step_benchmark(**case))
    split_moco = results.get("step_r50_split", {}).get("moco_img_per_s")
    section("feed", lambda: feed_rate(device, args.quick, split_moco))
    for name in list(cases)[4:]:
        section(name, lambda case=cases[name]: run_step_benchmark(**case))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
