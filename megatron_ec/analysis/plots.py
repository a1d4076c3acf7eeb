"""The analyses' figures: matplotlib with the Agg backend (no display), one PNG per call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def _layer_colours(num: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(num - 1, 1)) for i in range(num)]


def activation_figure(layers: Mapping[int, dict], title: str, path: Path) -> str:
    """Fig. 9: sorted activation share per layer (left), Lorenz curves with Gini (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for colour, (layer, summary) in zip(_layer_colours(len(layers)), layers.items()):
        shares = summary["sorted_share"]
        left.plot(range(1, len(shares) + 1), shares, color=colour, marker=".",
                  label=f"layer {layer}")
        right.plot(summary["lorenz_x"], summary["lorenz_y"], color=colour,
                   label=f"layer {layer}: Gini {summary['gini']:.3f}")
    right.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="uniform")
    left.set(xlabel="expert rank (most activated first)", ylabel="activation probability",
             title=f"{title}: sorted expert activations")
    right.set(xlabel="cumulative share of experts (least used first)",
              ylabel="cumulative share of activations", title=f"{title}: Lorenz curves")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
    return _save(fig, path)


def activation_heatmaps(models: Sequence[tuple[str, dict[int, list[float]],
                                               dict[int, list[int]]]], path: Path) -> str:
    """Fig. 3: per model, activation share per layer (rows) and expert (columns), condensers
    outlined."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 3.8), squeeze=False)
    for axis, (label, shares, condensers) in zip(axes[0], models):
        layers = sorted(shares)
        grid = [shares[layer] for layer in layers]
        image = axis.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        for row, layer in enumerate(layers):
            for expert in condensers.get(layer, []):
                axis.add_patch(plt.Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False,
                                             edgecolor="cyan", linewidth=1.5))
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set(xlabel="expert id", ylabel="layer", title=label)
        fig.colorbar(image, ax=axis, label="activation probability")
    return _save(fig, path)


def per_layer_lines(series: Mapping[str, Mapping[int, float]], ylabel: str, title: str,
                    path: Path) -> str:
    """One line per model over the MoE layers (Fig. 4 / 5)."""
    fig, axis = plt.subplots(figsize=(6.4, 4))
    for label, values in series.items():
        layers = sorted(values)
        axis.plot(layers, [values[layer] for layer in layers], marker="o", label=label)
    axis.set(xlabel="layer", ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)


def step_lines(steps: Sequence[int], series: Mapping[str, Sequence[float | None]],
               ylabel: str, title: str, path: Path) -> str:
    """Curves over training steps (Fig. 6); None values are gaps."""
    fig, axis = plt.subplots(figsize=(6.4, 4))
    for label, values in series.items():
        points = [(s, v) for s, v in zip(steps, values) if v is not None]
        if points:
            axis.plot(*zip(*points), marker=".", label=label)
    axis.set(xlabel="training step", ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str,
                 title: str, path: Path) -> str:
    """Bars of several series side by side per group (App. M, Fig. 8)."""
    fig, axis = plt.subplots(figsize=(max(6.4, 0.35 * len(groups) * len(series)), 4))
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, values, width=width, label=label)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(groups)), groups, rotation=90 if len(groups) > 16 else 0)
    axis.set(ylabel=ylabel, title=title)
    axis.grid(alpha=0.3, axis="y")
    axis.legend()
    return _save(fig, path)
