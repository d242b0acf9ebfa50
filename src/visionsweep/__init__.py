"""visionsweep: configuration-driven computer-vision experiments (timm + albumentations + Lightning + Hydra)."""

import os as _os

# albumentations checks PyPI for updates on import (2 s timeout offline): never wanted in a training run.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    # ${vs.cwd:} is where the command was started. Unlike ${hydra:runtime.cwd} it also resolves
    # before a job starts, which a multirun needs to place its sweep dir.
    if not OmegaConf.has_resolver("vs.cwd"):
        OmegaConf.register_new_resolver("vs.cwd", _os.getcwd)


_register_resolvers()
