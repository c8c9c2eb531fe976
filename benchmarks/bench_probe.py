"""``moco bench probe``: the cached linear probe against the full protocol, like for like.

The same backbone, data and hyperparameters (the ``lincls`` recipe with ``--epochs`` and the
milestones scaled to 60% and 80% of them) go through :func:`pipelines.evaluate.probe.run_probe`
twice, as users run it: ``full`` (Ray Train worker, a fresh RandomResizedCrop + flip view of
every image every epoch, the backbone run every step) and ``cached`` (centre-crop features
extracted once by Ray Data, the fc trained on them). Reported: top-1 / top-5 of each and their
difference (the target: cached within ~1 point of full), the wall time of each from the call to
the result (Ray start-up, planning and extraction included), ``ratio`` = full seconds / cached
seconds, and, beside it, a second cached call that reads the features back (what every trial of
a Tune grid costs).

Data: the demo's photo crops (32 px, labelled by photo; ``pipelines.demo``). Backbone: any SOURCE
(``--backbone``; a ``moco demo`` run is the natural one), else a seeded random-init ResNet-18 with
the small-image stem.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info
from benchmarks.corpus import default_work_dir
from pipelines.console import note


def _random_backbone(seed: int) -> Any:
    from moco_core.encoders import build_backbone
    from pipelines.evaluate.backbones import Backbone

    torch.manual_seed(seed)
    module, _ = build_backbone("resnet18", small_image_stem=True)
    config = {"augment": {"size": 32}, "eval": {"crop_fraction": 1.0}}
    return Backbone("resnet18", True, module.state_dict(), "random initialisation", "random", {"config": config})


def run_probe_benchmark(
    work_dir: str | None, backbone: str | None, epochs: int, overrides: list[str], cpus_per_worker: float
) -> dict:
    from pipelines.demo import build_demo_shards
    from pipelines.evaluate.probe import run_probe
    from pipelines.evaluate.probe_config import load_probe_config
    from pipelines.ray_runtime import ensure_ray

    root = Path(work_dir) if work_dir else default_work_dir()
    train, val = build_demo_shards(root / "probe-data", "photos")
    source = backbone or _random_backbone(0)
    milestones = f"optim.milestones=[{round(0.6 * epochs)},{round(0.8 * epochs)}]"
    base = [f"optim.epochs={epochs}", milestones, "tracking.enabled=false", *overrides]
    config = load_probe_config("lincls", base + ["scaling.workers=1", f"scaling.cpus_per_worker={cpus_per_worker}"])
    ensure_ray()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        for name, mode, output in (
            ("full", "full", "full"),
            ("cached", "cached", "cached"),
            ("cached_reused", "cached", "cached"),
        ):
            note(f"bench probe: {name}")
            started = time.perf_counter()
            summary = run_probe(source, [train], [val], str(Path(scratch) / output), config, mode)
            results[name] = {
                "top1": round(summary["top1"], 2),
                "top5": round(summary["top5"], 2),
                "seconds": round(time.perf_counter() - started, 3),
                **({"extract_seconds": summary["extract_seconds"]} if mode == "cached" else {}),
                **({"images_per_s": round(summary["images_per_s"], 1)} if mode == "full" else {}),
            }
    return {
        "benchmark": "probe",
        "machine": machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "data": {
            "train": train,
            "val": val,
            "train_images": summary["train_images"],
            "val_images": summary["val_images"],
        },
        "backbone": backbone or "random-init resnet18 (small stem, seed 0)",
        "settings": {"epochs": epochs, "overrides": base, "cpus_per_worker": cpus_per_worker},
        **results,
        "top1_difference": round(results["cached"]["top1"] - results["full"]["top1"], 2),
        "ratio": _seconds_ratio(results["full"], results["cached"]),
        "ratio_reused": _seconds_ratio(results["full"], results["cached_reused"]),
    }


def _seconds_ratio(slower: dict[str, Any], faster: dict[str, Any]) -> float:
    """slower seconds / faster seconds; a reuse of cached features can take under a millisecond."""
    return round(slower["seconds"] / max(faster["seconds"], 0.001), 2)
