"""visionsweep: configuration-driven computer-vision experiments (timm + albumentations + Lightning + Hydra)."""

import os as _os

# albumentations checks PyPI for updates on import (2 s timeout offline): never wanted in a training run.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
