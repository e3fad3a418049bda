"""The measured-vs-predicted energy figure of a GPU results folder (needs matplotlib; skipped without)."""

from __future__ import annotations

import math
from pathlib import Path

from gpu_report_data import Dataset, gpu_short

PLOT_NAME = "measured_vs_predicted.png"
#: Plot colour order by file label, so that a file name has the same colour on every GPU's plot.
PLOT_LABELS = ("llama8b", "llama8b_graphs", "qwen3_30b_a3b", "qwen3_30b_a3b_graphs", "qwen3_32b_graphs")


def plot(folder: Path, datasets: list[Dataset]) -> str | None:
    """Write ``folder/PLOT_NAME``; returns its name, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), sharex=True, sharey=True)
    markers = {"prefill": "o", "decode": "s"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, (("an", "analytic (roofline)"), ("gnn", "GNN (plugin default)"))):
        lo, hi = math.inf, 0.0
        for ds in datasets:
            index = (PLOT_LABELS.index(ds.label) if ds.label in PLOT_LABELS
                     else len(PLOT_LABELS) + [d.label for d in datasets if d.label not in PLOT_LABELS].index(ds.label))
            for phase in ("prefill", "decode"):
                sel = [r for r in ds.rows if r["phase"] == phase and math.isfinite(r[f"{key}_j"])
                       and math.isfinite(r["energy_j_per_step"])]
                if not sel:
                    continue
                x = [r[f"{key}_j"] for r in sel]
                y = [r["energy_j_per_step"] for r in sel]
                lo, hi = min(lo, *x, *y), max(hi, *x, *y)
                color = colors[index % len(colors)]
                hollow = ds.preds.is_moe
                ax.scatter(x, y, marker=markers[phase], s=34, edgecolors=color,
                           facecolors="none" if hollow else color, alpha=0.85,
                           label=f"{ds.label} {phase}" + (" (MoE, not scored)" if hollow else ""))
        if hi > 0:
            ax.plot([lo / 1.5, hi * 1.5], [lo / 1.5, hi * 1.5], color="grey", lw=1, ls="--")
            ax.plot([lo / 1.5, hi * 1.5], [lo / 1.5 * 1.3, hi * 1.5 * 1.3], color="grey", lw=0.6, ls=":")
            ax.plot([lo / 1.5, hi * 1.5], [lo / 1.5 / 1.3, hi * 1.5 / 1.3], color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted J/step")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("measured J/step (NVML counter)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    short, nvml_name = gpu_short(datasets[0].preds.hardware.gpu), datasets[0].rows[0]["gpu"]
    fig.suptitle(f"{short}{'' if nvml_name == 'NVIDIA ' + short else f' ({nvml_name})'}, reference PyTorch "
                 "transformer (not vLLM): measured vs predicted energy per step "
                 "(dashed: equal, dotted: +-30 %)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.77, 1))
    fig.savefig(folder / PLOT_NAME, dpi=120)
    plt.close(fig)
    return PLOT_NAME
