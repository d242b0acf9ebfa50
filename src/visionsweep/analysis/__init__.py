"""What a CNN sees: kernels, feature maps, filters, occlusion, Grad-CAM, data previews, error analysis.

Each mode is a ``run(cfg, index)`` function writing PNGs through :class:`plots.Index`; the
``visionsweep.see`` entry point picks one from ``see.modes()`` with ``see=<mode>``.
"""
