"""The sweeps' figures (matplotlib, imported lazily; a missing matplotlib skips them).

* probe: top-1 over lr x weight decay as a heat map (the best over any other swept key);
* momentum: top-1 against m, failed trials marked ``fail`` as in the paper's table;
* mechanism: top-1 against K per mechanism, K on a log scale (the paper's Figure 3).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

PROBE_PLOT = "probe_grid.png"
MOMENTUM_PLOT = "momentum.png"
MECHANISM_PLOT = "mechanism_k.png"
MARKERS = {"end_to_end": "s", "memory_bank": "^", "moco": "o"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _score(row: dict[str, Any]) -> float | None:
    value = row.get("top1")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def probe_heatmap(output: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Validation top-1 over lr (columns) x weight decay (rows)."""
    plt = _pyplot()
    lrs = sorted({float(row["optim.lr"]) for row in rows if "optim.lr" in row})
    decays = sorted({float(row.get("optim.weight_decay", 0.0) or 0.0) for row in rows})
    if not lrs:
        return None
    grid = [[math.nan] * len(lrs) for _ in decays]
    for row in rows:
        score = _score(row)
        if score is None or "optim.lr" not in row:
            continue
        i, j = decays.index(float(row.get("optim.weight_decay", 0.0) or 0.0)), lrs.index(float(row["optim.lr"]))
        grid[i][j] = score if math.isnan(grid[i][j]) else max(grid[i][j], score)
    figure, axes = plt.subplots(figsize=(1.0 + 0.9 * len(lrs), 1.2 + 0.6 * len(decays)))
    image = axes.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    axes.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    axes.set_yticks(range(len(decays)), [f"{wd:g}" for wd in decays])
    axes.set(xlabel="lr", ylabel="weight decay", title="linear probe: validation top-1 (%)")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            text = "-" if math.isnan(value) else f"{value:.1f}"
            axes.text(j, i, text, ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axes)
    return _save(figure, output / PROBE_PLOT)


def momentum_plot(output: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Top-1 against m (evenly spaced, as the paper's table); failed trials marked ``fail``."""
    plt = _pyplot()
    values = sorted({float(row["momentum.base"]) for row in rows if "momentum.base" in row})
    if not values:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5))
    best: dict[float, float | None] = {}
    for m in values:
        scores = [s for row in rows if float(row.get("momentum.base", -1)) == m and (s := _score(row)) is not None]
        best[m] = max(scores) if scores else None
    xs = [i for i, m in enumerate(values) if best[m] is not None]
    axes.plot(xs, [best[values[i]] for i in xs], marker="o")
    for i, m in enumerate(values):
        score = best[m]
        if score is None:
            axes.annotate("fail", (i, 0), ha="center", va="bottom", color="red")
        else:
            axes.annotate(f"{score:.1f}", (i, score), textcoords="offset points", xytext=(0, -14), ha="center")
    axes.set_xticks(range(len(values)), [f"{m:g}" for m in values])
    axes.set(xlabel="momentum m", ylabel="top-1 (%)", title="MoCo: accuracy against the key encoder's momentum")
    axes.set_ylim(0, 105)
    return _save(figure, output / MOMENTUM_PLOT)


def mechanism_plot(output: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Top-1 against K per mechanism, K on a log scale."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.8))
    drawn, ks = False, set()
    for mechanism in ("end_to_end", "memory_bank", "moco"):
        points = sorted(
            (int(row["k"]), score)
            for row in rows
            if row.get("mechanism") == mechanism and (score := _score(row)) is not None
        )
        ks.update(k for k, _ in points)
        if points:
            axes.plot(*zip(*points), marker=MARKERS[mechanism], label=mechanism.replace("_", "-"))
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    axes.minorticks_off()
    axes.set(xlabel="K (negatives)", ylabel="top-1 (%)", title="contrastive loss mechanisms against K")
    axes.legend()
    return _save(figure, output / MECHANISM_PLOT)


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
