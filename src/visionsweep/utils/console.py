"""What a run prints: our config tree, Lightning's progress bar and our summary line, not library chatter.

Only messages known to be noise are silenced, each by its text, so a real warning still shows:
Lightning's litlogger advert, the ``LeafSpec`` deprecation Lightning triggers inside torch (not ours to
fix), wandb's offline hints, and onnxscript's INFO lines during export.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISE = ("💡 Tip: For seamless cloud logging",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE)


def quiet_libraries() -> None:
    """Silence the known noise (idempotent); called by every entry point before Hydra starts."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")  # offline runs: no "anonymous"/sync hints per job
