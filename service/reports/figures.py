"""The reports' PNG figures (matplotlib, Agg backend: no display needed), shared by the MNIST reproduction and
a user's detector report: ROC curves, score histograms per attack group, and the reproduction's line, scatter and
histogram figures. Each function writes one file and closes its figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("clean", "noisy", "adversarial")


def _plt() -> Any:
    """pyplot on the Agg backend, imported on first use (matplotlib is slow to import and no server path needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _two_classes(labels: np.ndarray) -> bool:
    return len(np.unique(np.asarray(labels))) == 2


def _roc_axes(ax: Any, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str,
              operating_points: Mapping[str, tuple[float, float]] | None) -> None:
    """Draw ROC curves (label -> (is_adversarial, scores)) and (FPR, TPR) points on one axes; a curve whose labels
    hold one class only has no ROC and is left out (said in the panel when none is left)."""
    from sklearn.metrics import roc_curve

    drawn = 0
    for name, (labels, scores) in curves.items():
        if not _two_classes(labels):
            continue
        fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores))
        ax.plot(fpr, tpr, label=name)
        drawn += 1
    for marker, (name, (fpr, tpr)) in zip("osD^v", (operating_points or {}).items(), strict=False):
        if np.isfinite(fpr) and np.isfinite(tpr):
            ax.plot([fpr], [tpr], marker=marker, ls="none", color="black", mfc="none", ms=7, mew=1.5, label=name)
            drawn += 1
    if curves and not drawn:
        ax.text(0.5, 0.5, "no ROC: one class only", ha="center", va="center", fontsize=8)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set(title=title, xlabel="FPR")


def roc_panels(path: Path, panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], *,
               operating_points: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
               panel_size: tuple[float, float] = (3.0, 3.2), dpi: int = 100, legend_size: float = 6) -> Path:
    """ROC curves side by side: one panel per title (title -> curves, label -> (is_adversarial, scores)), with
    optional (FPR, TPR) points per panel; the legend on the first panel."""
    plt = _plt()
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(panel_size[0] * n, panel_size[1]), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=False):
        _roc_axes(ax, curves, title, (operating_points or {}).get(title))
    axes[0][0].set_ylabel("TPR")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=legend_size)
    return _save(fig, path, dpi)


def roc_figure(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str,
               operating_points: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """One ROC panel: curves (label -> (is_adversarial, scores)) and operating points (label -> (FPR, TPR))."""
    return roc_panels(path, {title: curves}, operating_points={title: operating_points or {}},
                      panel_size=(5.0, 4.2), dpi=110, legend_size=7)


def _histogram_axes(ax: Any, samples: Mapping[str, np.ndarray], bins: Any) -> None:
    """Overlaid histograms of the non-empty samples, each labelled with its count."""
    for name, values in samples.items():
        if len(values):
            ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (n={len(values)})")


def _shared_bins(samples: Sequence[np.ndarray], count: int) -> Any:
    values = [np.asarray(v, dtype=float) for v in samples if len(v)]
    if not values:
        return 10
    low, high = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    return np.linspace(low, high, count) if high > low else count


def histogram_figure(path: Path, samples: Mapping[str, np.ndarray], *, xlabel: str, ylabel: str, title: str,
                     bins: int = 40) -> Path:
    """Overlaid histograms of a few samples (name -> values) on shared bins, as the paper's Figure 4a."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    _histogram_axes(ax, samples, _shared_bins(list(samples.values()), bins))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return _save(fig, path, 110)


def score_histograms(path: Path, scores: np.ndarray, is_adversarial: np.ndarray, kind: np.ndarray,
                     groups: np.ndarray, threshold: float, title: str, bins: int = 25) -> Path:
    """One panel per attack group: the scores of its clean, noisy and adversarial rows on shared bins, the
    threshold marked, the group's AUC (%) in its title (n/a with one class missing)."""
    from service.detect.detector import auc_score

    plt = _plt()
    scores, is_adversarial = np.asarray(scores, dtype=float), np.asarray(is_adversarial, dtype=bool)
    kind, groups = np.asarray(kind), np.asarray(groups)
    names = list(dict.fromkeys(groups.tolist()))
    n = max(len(names), 1)
    cols = min(n, 3)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(3.6 * cols, 6.0), 2.9 * nrows + 0.4), squeeze=False)
    edges = _shared_bins([scores], bins)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        if not names:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center")
            ax.set(title="no attack group")
            continue
        rows = groups == names[i]
        _histogram_axes(ax, {k: scores[rows & (kind == k)] for k in KINDS}, edges)
        if np.isfinite(threshold):
            ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3g}")
        auc = auc_score(is_adversarial[rows], scores[rows])
        ax.set(title=f"{names[i]} (AUC {'n/a' if auc != auc else f'{100 * auc:.1f}%'})", xlabel="score")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for r in range(nrows):
        axes[r][0].set_ylabel("rows")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, 100)


def line_figure(path: Path, x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str, ylabel: str,
                title: str, linestyles: Mapping[str, str] | None = None) -> Path:
    """Lines with markers over a shared x (label -> y values; None is a gap), as the paper's Figure 2a."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, values in series.items():
        y = [float("nan") if v is None else v for v in values]
        ax.plot(list(x), y, marker="o", ls=(linestyles or {}).get(name, "-"), label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return _save(fig, path, 110)


def scatter_figure(path: Path, x: np.ndarray, y: np.ndarray, *, xlabel: str, ylabel: str, title: str) -> Path:
    """A scatter plot of y against x, as the paper's Figure 3."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(x, y, s=6, alpha=0.6)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path, 110)
