"""The report's two plots, as PNG data: URIs (matplotlib's object API, Agg; no pyplot).

Scores are DN2 anomaly scores: higher = more anomalous.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HIST_BINS = 60


def histogram_png(scores: np.ndarray, normal: np.ndarray | None) -> str:
    """Histograms (shared bins) of a partition's scores (n,) over the normal LOO scores (m,).

    Densities when the normal scores are given (the two sets differ in size),
    image counts otherwise. Both arrays must be finite.
    """
    fig, ax = _figure(8, 3.6)
    both = scores if normal is None or normal.size == 0 else np.concatenate([scores, normal])
    bins = np.histogram_bin_edges(both, bins=HIST_BINS)
    density = normal is not None and normal.size > 0
    if density:
        ax.hist(normal, bins=bins, density=True, alpha=0.5, color="tab:blue",
                label=f"normal set, leave-one-out (n={normal.size:,})")
        ax.axvline(float(np.percentile(normal, 99)), color="tab:blue", linestyle="--",
                   linewidth=1, label="normal 99th percentile")
    ax.hist(scores, bins=bins, density=density, histtype="step", linewidth=1.5,
            color="tab:red", label=f"this partition (n={scores.size:,})")
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("density" if density else "images")
    ax.legend(loc="upper right", fontsize="small")
    return _png_data_uri(fig)


def roc_png(fpr: np.ndarray, tpr: np.ndarray, auc: float) -> str:
    """The ROC curve (false vs true positive rates, (n,) each) with its AUC."""
    fig, ax = _figure(4.2, 4.2)
    ax.plot(fpr, tpr, color="tab:red", linewidth=1.5, label=f"DN2 (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize="small")
    return _png_data_uri(fig)


def _figure(width: float, height: float):
    """A figure on the Agg canvas: no pyplot, so no global state shared between threads."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _png_data_uri(fig: Figure) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
