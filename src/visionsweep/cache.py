"""Pre-fill the decoded-sample cache: ``python -m visionsweep.cache [train overrides]`` (``make cache``).

Composes the training config with the same overrides a run would get, builds its data module (scan,
check, split) and decodes every image of every split once into the cache, with a progress bar, so the
first epoch of the runs and sweep jobs that follow reads small samples instead of decoding. A config
with ``data.cache=none`` fills the disk cache (the only one that outlives this process). The cache
itself is :mod:`visionsweep.data.cache`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Console entry point: fill the cache of the training config ``argv`` (default: the command line).

    Args:
        argv: Training overrides, e.g. ``["data=folder", "data.root=/photos", "model=resnet34"]``.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from visionsweep.data.cache import check_mode
    from visionsweep.utils.cli import CONF_DIR, fail, precheck, user_error

    args = sys.argv[1:] if argv is None else argv
    precheck("train", args)
    from visionsweep import builders  # torch, Lightning, timm: after the overrides are checked
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=list(args), return_hydra_config=False)
        with open_dict(cfg):
            if check_mode(cfg.data.get("cache")) == "none":
                cfg.data.cache = "disk"
            cfg.paths.output_dir = None
        inp = builders.resolve_inputs(cfg)
        dm = builders.build_datamodule(cfg, inp, None)
        print(dm.describe(), flush=True)
        done = dm.prefill_cache(progress=True)
        print(f"cache ready: {done}", flush=True)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        fail(str(err))


if __name__ == "__main__":
    main()
