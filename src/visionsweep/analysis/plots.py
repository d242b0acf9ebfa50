"""Figure helpers shared by every ``see`` mode: fixed-size grids, overlays, and the run's index.

Figures are saved without ``bbox_inches="tight"`` so a PNG's pixel size follows from its grid alone
(``cols * panel * dpi`` by ``rows * (panel * aspect + title) * dpi``); the index records rows, cols and size,
which is what the tests check the written files against.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # never open a window, also on machines with a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visionsweep.utils.atomic import atomic_write, json_default, save_figure  # noqa: E402
from visionsweep.utils.text import md_escape  # noqa: E402

def save_plot(fig: Any, path: str | Path, dpi: int = 110, **savefig_kwargs: Any) -> Path:
    """A chart (not a :func:`grid`): tight layout, saved atomically as ``path``, closed. Returns ``path``."""
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    return Path(path)


PANEL = 2.0     # inches per grid cell
TITLE = 0.35    # inches of title strip above each cell
DPI = 100


def grid_size(rows: int, cols: int, panel: float = PANEL, dpi: int = DPI, aspect: float = 1.0) -> tuple[int, int]:
    """Pixel (width, height) of a grid figure made by :func:`grid`."""
    return round(cols * panel * dpi), round(rows * (panel * aspect + TITLE) * dpi)


def grid(rows: int, cols: int, panel: float = PANEL, dpi: int = DPI, aspect: float = 1.0) -> tuple[Any, np.ndarray]:
    """A figure of ``rows x cols`` image cells with room for a title over each.

    Args:
        rows: number of rows.
        cols: number of columns.
        panel: cell width in inches.
        dpi: dots per inch of the saved PNG.
        aspect: cell height / width (1: square cells; an image's h/w fits it exactly).

    Returns:
        ``(figure, axes)`` with ``axes`` a 2-D array, every axis already without ticks.
    """
    width, height = grid_size(rows, cols, panel, dpi, aspect)
    fig, axes = plt.subplots(rows, cols, figsize=(width / dpi, height / dpi), dpi=dpi, squeeze=False)
    # a title strip above every row: axes are `panel * aspect` high, the strips fill the rest
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.0, top=1 - TITLE * dpi / height,
                        wspace=0.04, hspace=TITLE / (panel * aspect))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.visionsweep_grid = {"rows": rows, "cols": cols, "panel": panel, "dpi": dpi, "aspect": aspect}
    return fig, axes


def show(ax: Any, image: np.ndarray, title: str = "", cmap: str | None = None, **kwargs: Any) -> Any:
    """Draw one image (HWC uint8/float RGB or HW single channel) in a cell with a short title.

    Returns:
        The ``AxesImage`` (a mappable for :func:`colorbar`).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    shown = ax.imshow(image, cmap=cmap or ("gray" if image.ndim == 2 else None), **kwargs)
    if title:
        ax.set_title(title, fontsize=8)
    return shown


def overlay(ax: Any, image: np.ndarray, heat: np.ndarray, title: str = "", alpha: float = 0.7,
            cmap: str = "jet", vmax: float = 1.0) -> Any:
    """Draw ``image`` with a heat map (0..``vmax``) on top; low values stay transparent so the image shows.

    Returns:
        A mappable of the heat map's colours and range, for :func:`colorbar`.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    show(ax, image, title)
    vmax = float(vmax) if vmax > 0 else 1.0
    heat = np.clip(np.asarray(heat, dtype=np.float32) / vmax, 0, 1)
    rgba = plt.get_cmap(cmap)(heat)
    rgba[..., 3] = alpha * heat
    ax.imshow(rgba, extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
    return ScalarMappable(Normalize(0.0, vmax), plt.get_cmap(cmap))


def colorbar(ax: Any, mappable: Any, label: str = "") -> Any:
    """A slim colour bar in the right fifth of ``ax``'s cell (the grid and the PNG size stay as planned).

    The image keeps the left four fifths, pushed right against the bar; the bar's tick labels use the
    rest of the cell, so nothing runs into the next cell.

    Returns:
        The ``Colorbar`` (its axis joins ``ax.figure.axes``).
    """
    pos = ax.get_position()
    ax.set_position((pos.x0, pos.y0, pos.width * 0.8, pos.height))
    ax.set_anchor("E")
    cax = ax.figure.add_axes((pos.x0 + pos.width * 0.82, pos.y0 + pos.height * 0.08, pos.width * 0.045,
                              pos.height * 0.84), label="<colorbar>")
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    bar = ax.figure.colorbar(mappable, cax=cax)
    bar.locator, bar.formatter = MaxNLocator(5), FormatStrFormatter("%.2g")  # short tick labels that fit the cell
    bar.update_ticks()
    bar.ax.tick_params(labelsize=6, length=2, pad=1)
    if label:
        bar.set_label(label, fontsize=6, labelpad=1)
    return bar


def to_display(image: np.ndarray) -> np.ndarray:
    """Scale any float map to 0..1 for display (flat maps, float noise included, become zeros)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi), abs(lo)):
        return np.zeros_like(image)
    return (image - lo) / (hi - lo)


class Index:
    """What a ``see`` run wrote: one entry per PNG, free-form notes and data, saved as index.json/.md.

    Args:
        out_dir: the run's output folder (created).
        mode: the ``see`` mode (kernels, features, ...).
    """

    def __init__(self, out_dir: str | Path, mode: str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.files: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}

    def save(self, fig: Any, name: str, title: str, **info: Any) -> Path:
        """Save ``fig`` as ``<out_dir>/<name>.png``, close it and record it with its grid and size."""
        path = self.out_dir / f"{name}.png"
        save_figure(fig, path, dpi=fig.dpi)
        width, height = (round(v) for v in fig.get_size_inches() * fig.dpi)
        plt.close(fig)
        layout = getattr(fig, "visionsweep_grid", {})
        self.files.append({"file": path.name, "title": title, **layout, "width": width, "height": height,
                           **info})
        return path

    def note(self, text: str) -> None:
        """Add a one-line note (e.g. why a method does not apply)."""
        self.notes.append(text)

    def write(self) -> Path:
        """Write ``index.json`` and ``index.md``; returns the JSON path."""
        payload = {"mode": self.mode, "files": self.files, "notes": self.notes, **self.data}
        path = self.out_dir / "index.json"
        atomic_write(path, json.dumps(payload, indent=2, default=json_default) + "\n")
        # titles and notes carry class names, paths and preset names: escaped (md_escape), links URL-quoted
        lines = [f"# see={md_escape(self.mode)}", ""]
        lines += [f"- [{md_escape(f['file'])}]({quote(f['file'])}): {md_escape(f['title'])} "
                  f"({f['width']}x{f['height']} px)" for f in self.files]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {md_escape(n)}" for n in self.notes]
        atomic_write(self.out_dir / "index.md", "\n".join(lines) + "\n")
        return path
