"""``torch.compile`` for the model's network, as a callback (``callbacks.compile.enabled=true``).

The network is compiled in place (``nn.Module.compile``), so parameter names and checkpoints are the same
as without compiling: a compiled run's checkpoint loads into an uncompiled model and vice versa.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger("visionsweep.compile")


class CompileModel(pl.Callback):
    """Compile ``pl_module.net`` (or the whole module when it has no ``net``) before fitting/evaluating.

    Args:
        enabled: Off by default: compiling costs tens of seconds up front and pays off on GPUs with
            long runs (fuses the normalisation and elementwise ops, fewer kernel launches).
        mode: ``torch.compile`` mode: None (default), ``reduce-overhead``, ``max-autotune``.
        backend: Compiler backend (``inductor``; ``eager`` / ``aot_eager`` for debugging).
        dynamic: Passed to ``torch.compile`` (None: let it decide; the last, smaller batch may recompile).
        fullgraph: Passed to ``torch.compile``.
    """

    def __init__(self, enabled: bool = False, mode: str | None = None, backend: str = "inductor",
                 dynamic: bool | None = None, fullgraph: bool = False) -> None:
        super().__init__()
        self.enabled, self.mode, self.backend = bool(enabled), mode, backend
        self.dynamic, self.fullgraph = dynamic, bool(fullgraph)
        self.compiled: torch.nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self.compiled is not None:
            return
        target: Any = getattr(pl_module, "net", pl_module)
        kwargs = {"backend": self.backend, "dynamic": self.dynamic, "fullgraph": self.fullgraph}
        if self.mode:
            kwargs["mode"] = self.mode
        target.compile(**kwargs)  # in place: state_dict keys unchanged (no "_orig_mod." prefix)
        self.compiled = target
        log.info("torch.compile(%s): %s", type(target).__name__, kwargs)
