"""What a CNN sees: kernels, feature maps, filters, occlusion, Grad-CAM, data previews, error analysis.

Each mode is a ``run(cfg, index)`` function writing PNGs through :class:`plots.Index`; the
``visionsweep.see`` entry point picks one with ``see=<mode>``.
"""

from __future__ import annotations

# mode → "module:function", imported only when chosen (kernels needs no torch model at all)
MODES: dict[str, str] = {
    "kernels": "visionsweep.analysis.kernels:run",
    "augment": "visionsweep.analysis.previews:run_augment",
    "batch": "visionsweep.analysis.previews:run_batch",
    "features": "visionsweep.analysis.features:run_features",
    "filters": "visionsweep.analysis.features:run_filters",
    "occlusion": "visionsweep.analysis.occlusion:run",
    "gradcam": "visionsweep.analysis.cam:run",
    "errors": "visionsweep.analysis.interpret:run",
}

__all__ = ["MODES"]
