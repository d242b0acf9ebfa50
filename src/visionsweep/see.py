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


def modes() -> dict[str, Callable[[DictConfig, Index], None]]:
    """Mode (``name`` of conf/see/<mode>.yaml) → the function that writes its pictures into the index.

    Imported on first use, not with this module: the analysis modules load torch (~2 s of
    ``python -X importtime visionsweep.see``), which ``--help`` or a mistyped override does not need.
    """
    from visionsweep.analysis import cam, features, interpret, kernels, occlusion, previews

    return {"kernels": kernels.run, "augment": previews.run_augment, "batch": previews.run_batch,
            "features": features.run_features, "filters": features.run_filters, "occlusion": occlusion.run,
            "gradcam": cam.run, "errors": interpret.run}


def see(cfg: DictConfig) -> dict[str, Any]:
    """Run the ``see`` mode ``cfg.see.name``; returns the index written (mode, files, notes, data)."""
    mode, runners = str(cfg.see.get("name", "")), modes()
    if mode not in runners:
        close = difflib.get_close_matches(mode, runners, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"see={mode}: no such mode{hint}; choose one of {', '.join(runners)}")
    out = Path(str(cfg.get("out_dir") or cfg.paths.output_dir)).expanduser()
    start = time.perf_counter()
    index = Index(out, mode)
    runners[mode](cfg, index)
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
