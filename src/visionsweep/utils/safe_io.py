"""Lightning's writers made atomic: checkpoints (:class:`AtomicCheckpointIO`) and the CSV logger.

Both write ``<name>.tmp`` and rename it when complete (:mod:`visionsweep.utils.atomic`), so a kill or a
full disk never leaves a truncated checkpoint or a torn metrics.csv under its real name.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.io import TorchCheckpointIO

from visionsweep.errors import DiskFullError
from visionsweep.utils.atomic import atomic_open, atomic_write, disk_full_cause, intact_rows, tmp_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing each checkpoint to ``<name>.tmp`` and renaming it.

    ``torch.save`` streams straight into the temporary file (Lightning's own writer first builds the
    whole checkpoint in memory); it is fsynced before the rename. Remote paths (``s3://`` ...) keep
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path``: complete under its name, or not there at all.

        Args:
            checkpoint: The state Lightning dumped.
            path: Target file.
            storage_options: Not supported (as in ``TorchCheckpointIO``).

        Raises:
            DiskFullError: No space left; the temporary file is removed, an older ``path`` is untouched.
        """
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        import torch

        with atomic_open(str(path).removeprefix("file://"), "wb", fsync=True) as f:
            torch.save(checkpoint, f)


def _earlier_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The intact rows and header of a resumed run's metrics.csv (none without one).

    A damaged file (cut by a kill, edited) is copied aside first, as ``metrics.damaged.csv`` (or
    ``metrics.damaged-<n>.csv``), since Lightning replaces metrics.csv: one warning names both files.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as e:
        log.warning("%s cannot be read (%s): this run's metrics.csv starts afresh", path, e.strerror or e)
        return [], []
    rows, header, problem = intact_rows(raw, path, "this run's metrics.csv starts afresh")
    if problem:
        kept, n = path.with_name("metrics.damaged.csv"), 1
        while kept.exists():
            kept, n = path.with_name(f"metrics.damaged-{n}.csv"), n + 1
        atomic_write(kept, raw)
        log.warning("%s (the damaged file is kept as %s)", problem, kept.name)
    return rows, header


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV ``ExperimentWriter`` rewriting metrics.csv whole, atomically, on each save.

    Lightning appends to the file (and rewrites it in place when a column appears), so a kill or a full
    disk can leave a torn row. The rows are few: keeping them all and writing the complete file to
    ``metrics.csv.tmp``, then renaming it, costs little.
    """

    def __init__(self, log_dir: str) -> None:
        # Lightning deletes an existing metrics.csv here; a job resumed in its own dir (a resumed sweep)
        # keeps the epochs it had finished, so read them first (see _adopt_earlier_rows)
        self._earlier = _earlier_rows(Path(log_dir) / self.NAME_METRICS_FILE)
        super().__init__(log_dir=log_dir)
        self._rows: list[dict[str, Any]] = []

    def _adopt_earlier_rows(self) -> None:
        """Keep the earlier rows from before the first step logged now (a resume logs the rest again).

        At that step the earlier file holds the last finished epoch's epoch-end rows (kept) and the next
        epoch's learning-rate row (logged again now, so dropped).
        """
        rows, keys = self._earlier
        self._earlier = ([], [])
        first = min(int(m.get("step", 0)) for m in self.metrics)

        def before(r: dict[str, str]) -> bool:
            step = int(float(r.get("step") or 0))  # intact rows only: a whole number or empty
            return step < first or (step == first and r.get("epoch") not in (None, ""))

        kept = [r for r in rows if before(r)]
        if kept:
            self._rows = kept + self._rows
            self.metrics_keys = list(dict.fromkeys([*keys, *self.metrics_keys]))

    def save(self) -> None:
        """Write every row recorded so far (under the header of all keys seen)."""
        if not self.metrics:
            return
        self._record_new_keys()
        if self._earlier[0]:
            self._adopt_earlier_rows()
        self._rows.extend(self.metrics)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write(self.metrics_file_path, buf.getvalue())
        self.metrics = []

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Record hparams and write hparams.yaml atomically."""
        self.hparams.update(params)
        target = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        try:
            save_hparams_to_yaml(tmp_path(target), self.hparams)
            os.replace(tmp_path(target), target)
        except BaseException as e:
            tmp_path(target).unlink(missing_ok=True)
            if disk_full_cause(e) is not None:
                raise DiskFullError(target) from e
            raise


class AtomicCSVLogger(CSVLogger):
    """``CSVLogger`` whose metrics.csv and hparams.yaml are written whole (same arguments as CSVLogger)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicExperimentWriter:
        """The writer (made on first use)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    def finalize(self, status: str) -> None:
        """Save what is left; after a failure, a second write error is logged, not raised: Lightning
        finalizes loggers while the first error propagates, and that one names the file that failed."""
        try:
            super().finalize(status)
        except (OSError, DiskFullError) as e:
            if status != "failed":
                raise
            log.warning("metrics.csv not updated after the failure: %s", e)


# Lightning's CSVLogger, as a config may name it: built as an AtomicCSVLogger (same arguments)
CSV_TARGETS = ("pytorch_lightning.loggers.CSVLogger", "pytorch_lightning.loggers.csv_logs.CSVLogger",
               "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")
