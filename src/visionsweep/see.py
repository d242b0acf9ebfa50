"""Pictures of what a CNN sees: ``python -m visionsweep.see see=<mode> [image=...] [ckpt_path=...]``.

Modes (``conf/see/<mode>.yaml``): kernels, augment, batch, features, filters, occlusion, gradcam,
errors. Each writes PNGs plus ``index.json`` / ``index.md`` into the run dir (``runs/see/<stamp>/``)
or ``out_dir=``.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from visionsweep.analysis import MODES
from visionsweep.analysis.plots import Index
from visionsweep.errors import ConfigError
from visionsweep.utils.cli import guarded, precheck

log = logging.getLogger("visionsweep.see")


def see(cfg: DictConfig) -> dict[str, Any]:
    """Run the ``see`` mode ``cfg.see.name``; returns the index written (mode, files, notes, data)."""
    mode = str(cfg.see.get("name", ""))
    if mode not in MODES:
        raise ConfigError(f"see={mode}: choose one of {', '.join(MODES)}")
    out = Path(str(cfg.get("out_dir") or cfg.paths.output_dir)).expanduser()
    module, func = MODES[mode].split(":")
    runner = getattr(importlib.import_module(module), func)
    start = time.perf_counter()
    index = Index(out, mode)
    runner(cfg, index)
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
