"""Pictures of what a CNN sees: ``python -m visionsweep.see see=<mode> [image=...] [ckpt_path=...]``.

Modes (``conf/see/<mode>.yaml``): kernels, augment, batch, features, filters, occlusion, gradcam,
errors. Each writes PNGs plus ``index.json`` / ``index.md`` into the run dir (``runs/see/<stamp>/``)
or ``out_dir=``.
"""

from __future__ import annotations

import difflib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from visionsweep.analysis.plots import Index
from visionsweep.errors import ConfigError
from visionsweep.utils.cli import guarded, precheck

log = logging.getLogger("visionsweep.see")

# Each runner imports its module when called: every mode but kernels imports torch and timm (~1 s
# measured with `python -X importtime`), which `see=kernels` (scipy.ndimage on a photo) does not need.


def _kernels(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.kernels import run

    run(cfg, index)


def _augment(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.previews import run_augment

    run_augment(cfg, index)


def _batch(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.previews import run_batch

    run_batch(cfg, index)


def _features(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.features import run_features

    run_features(cfg, index)


def _filters(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.features import run_filters

    run_filters(cfg, index)


def _occlusion(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.occlusion import run

    run(cfg, index)


def _gradcam(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.cam import run

    run(cfg, index)


def _errors(cfg: DictConfig, index: Index) -> None:
    from visionsweep.analysis.interpret import run

    run(cfg, index)


# mode (``name`` of conf/see/<mode>.yaml) → the function that writes its pictures into the index
MODES: dict[str, Callable[[DictConfig, Index], None]] = {
    "kernels": _kernels, "augment": _augment, "batch": _batch, "features": _features,
    "filters": _filters, "occlusion": _occlusion, "gradcam": _gradcam, "errors": _errors,
}


def see(cfg: DictConfig) -> dict[str, Any]:
    """Run the ``see`` mode ``cfg.see.name``; returns the index written (mode, files, notes, data)."""
    mode = str(cfg.see.get("name", ""))
    if mode not in MODES:
        close = difflib.get_close_matches(mode, MODES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"see={mode}: no such mode{hint}; choose one of {', '.join(MODES)}")
    out = Path(str(cfg.get("out_dir") or cfg.paths.output_dir)).expanduser()
    start = time.perf_counter()
    index = Index(out, mode)
    MODES[mode](cfg, index)
    index.data["seconds"] = round(time.perf_counter() - start, 2)
    path = index.write()
    for f in index.files:
        print(f"  {f['file']}: {f['title']}")
    for note in index.notes:
        print(f"  note: {note}")
    print(f"see={mode}: {len(index.files)} PNG(s) → {out}  (index: {path.name})", flush=True)
    return {"mode": mode, "files": index.files, "notes": index.notes, **index.data}


@hydra.main(version_base="1.3", config_path="conf", config_name="see")
@guarded
def _hydra_main(cfg: DictConfig) -> None:
    see(cfg)


def main() -> None:
    """Console entry point: check the overrides, then hand over to Hydra."""
    precheck("see")
    _hydra_main()


if __name__ == "__main__":
    main()
