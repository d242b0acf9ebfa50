"""Old name of :mod:`visionsweep.callbacks.data_wait`, kept so runs recorded before the rename re-run
from their config.yaml (``_target_: visionsweep.callbacks.throughput.ThroughputMonitor``)."""

from __future__ import annotations

import warnings
from typing import Any

from visionsweep.callbacks.data_wait import DataWaitMonitor


class ThroughputMonitor(DataWaitMonitor):
    """Deprecated alias of :class:`~visionsweep.callbacks.data_wait.DataWaitMonitor`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn("visionsweep.callbacks.throughput.ThroughputMonitor is now "
                      "visionsweep.callbacks.data_wait.DataWaitMonitor", FutureWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
