"""Pictures of what a CNN sees: ``python -m visionsweep.see see=<mode> [image=...] [ckpt_path=...]``.

Modes (``conf/see/<mode>.yaml``): kernels, augment, batch, features, filters, occlusion, gradcam,
errors. Each writes PNGs plus ``index.json`` / ``index.md`` into the run dir (``runs/see/<stamp>/``)
or ``out_dir=``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from visionsweep.analysis.plots import Index
from visionsweep.data.images import bad_image_advice
from visionsweep.errors import ConfigError
from visionsweep.utils import checks
from visionsweep.utils.cli import guarded, precheck
from visionsweep.utils.atomic import check_out_dir, made_dir

log = logging.getLogger("visionsweep.see")


def _at_least(lowest: int, example: int) -> Callable[[Any, str], int]:
    return lambda v, k: checks.whole(v, k, lowest, None, example)


#: the see modes' numeric keys (conf/see/<mode>.yaml) → their check; a mode reads the ones it has
VALUES = {"samples": _at_least(1, 4), "variants": _at_least(1, 6), "max_images": _at_least(1, 4),
          "top_k": _at_least(1, 8), "pairs": _at_least(0, 10), "batch_size": _at_least(1, 32),
          "max_filters": _at_least(1, 64), "max_side": lambda v, k: checks.whole(v, k, 8, 4096, 320),
          "window": _at_least(1, 8), "stride": _at_least(1, 4), "per_eval": _at_least(1, 32),
          "compare_padding": checks.flag}


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
    checks.keys(cfg.see, VALUES, "see.")
    checks.whole(cfg.get("seed", 0), "seed", 0, 2**32 - 1, 0)
    out = Path(str(cfg.get("out_dir") or cfg.paths.output_dir)).expanduser()
    if cfg.get("out_dir"):
        check_out_dir(out, overwrite=bool(cfg.get("overwrite")))
    start = time.perf_counter()
    with made_dir(out):  # a failed mode leaves no out_dir it created
        index = Index(out, mode)
        # augment / batch build cfg.data (data.skip_bad_images applies); the others read image= or
        # the checkpoint run's split, where it does not
        fix = None if mode in ("augment", "batch") else "remove or replace it, or give another image= or data_root="
        with bad_image_advice(fix) if fix else contextlib.nullcontext():
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
