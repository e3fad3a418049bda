"""The two plots of an accuracy report: predicted vs measured (log-log, one panel per predictor) and the error CDF."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PlotStyle:
    band: float  # dotted lines at x band and / band around the diagonal
    panel_inches: float
    dpi: int
    quantity: str  # axis label, e.g. "batch energy (J)"
    scatter_title: str
    cdf_title: str
    cdf_lines_percent: tuple[float, ...] = (10.0,)
    cdf_from_percent: float = 0.5


def accuracy_plots(
    measured: np.ndarray, panels: dict[str, np.ndarray], curves: dict[str, np.ndarray], scatter: Path, cdf: Path,
    style: PlotStyle,
) -> list[Path]:  # fmt: skip
    """``panels`` get a scatter panel each, ``curves`` a line of the error CDF each; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = style.panel_inches
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), sharex=True, sharey=True)
    for ax, (name, values) in zip(np.atleast_1d(axes), panels.items()):
        ax.loglog(measured, values, ".", alpha=0.6)
        lim = [measured.min() / 2, measured.max() * 2]
        ax.plot(lim, lim, "k-", lw=0.8)
        ax.plot(lim, [v * style.band for v in lim], "k:", lw=0.6)
        ax.plot(lim, [v / style.band for v in lim], "k:", lw=0.6)
        ax.set_title(name, fontsize=9 if len(panels) > 3 else None)
        ax.set_xlabel(f"measured {style.quantity}")
    np.atleast_1d(axes)[0].set_ylabel(f"predicted {style.quantity}")
    fig.suptitle(style.scatter_title)
    fig.tight_layout()
    fig.savefig(scatter, dpi=style.dpi)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, values in curves.items():
        ok = np.isfinite(values)
        ape = np.sort(100 * np.abs(values[ok] - measured[ok]) / measured[ok])
        ax.plot(ape, np.arange(1, len(ape) + 1) / len(ape), label=name)
    ax.set_xscale("log")
    ax.set_xlim(style.cdf_from_percent, 1000)
    ax.set_xlabel("absolute percentage error (%)")
    ax.set_ylabel("share of rows")
    for percent in style.cdf_lines_percent:
        ax.axvline(percent, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(style.cdf_title)
    fig.tight_layout()
    fig.savefig(cdf, dpi=style.dpi)
    plt.close(fig)
    return [scatter, cdf]
