"""The PNGs a training run leaves in ``<run>/plots``: its learning curves (loss, and accuracy, mIoU or mAP:
the run's score) and its test confusion matrix (single-label classes, or a segmenter's pixel classes).

``plots=auto`` (the default; :func:`visionsweep.run_config.plots_wanted`) draws them for a single run.
A sweep's jobs leave them to the report, which draws every job's curves on one chart; a matplotlib figure
per job (~1 s) would cost a sweep of tiny jobs a fifth of its time. ``plots=true`` draws them in sweep jobs
too. A plot that fails is a warning: the run's results stand.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: the second panel's metric: the first of these the run logged (classification, segmentation, multi-label)
SCORES = ("acc", "miou", "map", "f1_macro")


def write_run_plots(run_dir: Path, classes: list[str] | None = None,
                    confusion: list[list[int]] | None = None) -> list[Path]:
    """Draw ``plots/curves.png`` from ``metrics.csv`` and ``plots/confusion.png`` from the test split's matrix.

    Args:
        run_dir: The run dir (``metrics.csv`` in it; ``plots/`` is created).
        classes: Class names, in the matrix's order.
        confusion: The test split's confusion matrix (rows: actual), as run.json's ``test_report`` holds it.

    Returns:
        The PNGs written (a plot that failed is left out, and a warning says why).
    """
    written = []
    try:
        from visionsweep.runinfo import read_curves

        curves = read_curves(Path(run_dir) / "metrics.csv")
        if curves:
            written.append(curves_png(curves, Path(run_dir) / "plots" / "curves.png"))
        if confusion and classes and len(confusion) == len(classes):
            import numpy as np

            from visionsweep.analysis import plots
            from visionsweep.analysis.interpret import confusion_figure

            confusion_figure(np.asarray(confusion), list(classes), plots.Index(Path(run_dir) / "plots", "run"))
            written.append(Path(run_dir) / "plots" / "confusion.png")
    except Exception as e:  # noqa: BLE001 - a plot never fails the run whose results it shows
        log.warning("run plots left out (%s: %s)", type(e).__name__, str(e).split("\n")[0])
    return written


def curves_png(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Loss (train, val) and the run's score (train, val) per epoch, each panel's best val epoch marked.

    Args:
        curves: ``{metric: [(epoch, value), ...]}`` (:func:`visionsweep.runinfo.read_curves`).
        path: The PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from visionsweep.analysis.plots import save_plot
    from visionsweep.runinfo import best_point, higher_is_better

    score = next((s for s in SCORES if f"val/{s}" in curves), None)
    panels = ["loss"] + ([score] if score else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        for split, style in (("train", "--"), ("val", "-")):
            series = curves.get(f"{split}/{name}")
            if series:
                epochs, values = zip(*series)
                ax.plot(epochs, values, style, marker="o", markersize=3, label=f"{split}/{name}")
        best = best_point(curves.get(f"val/{name}") or [], f"val/{name}")
        if best:
            ax.axvline(best[0], color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"best val/{name}: {best[1]:.4g} (epoch {best[0]})", xy=(0.02, 0.02),
                        xycoords="axes fraction", fontsize=8)
        direction = "higher" if higher_is_better(f"val/{name}") else "lower"
        ax.set(xlabel="epoch", ylabel=name, title=f"{name} per epoch ({direction} is better)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_plot(fig, path)
