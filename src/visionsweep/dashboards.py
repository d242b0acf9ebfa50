"""Loggers that make the dashboards compare the jobs of a sweep: TensorBoard's HParams tab and MLflow.

Both learn a job's labels (arch, aug, seed) from their config node (``conf/logger/*.yaml``
interpolates them) and its overrides from Hydra, so nothing else has to call them:

* :class:`SweepTensorBoardLogger` writes the HParams plugin's session info (arch, aug, seed and every
  override that varies in the sweep) into the same event file as the scalars, and keeps that one file
  open across ``trainer.fit`` and ``trainer.test`` (Lightning's logger closes its writer at the end of
  fit, and the test metrics then start a second event file).
* :class:`SweepMLFlowLogger` runs in the experiment and under the run name the job's config gives
  (:func:`visionsweep.run_config.label_loggers`: one experiment ``<task>-<sweep stamp>`` per sweep, runs
  ``<arch>-<aug>-seed<seed>[-job<n>]``, as wandb's groups and names), logs the job's overrides as params
  next to the model's arguments and tags it ``arch``/``aug``/``seed``/``run_dir``.
"""

from __future__ import annotations

import atexit
import contextlib
import time
import weakref
from argparse import Namespace
from pathlib import Path
from typing import Any, Iterator

from lightning_fabric.utilities.logger import _convert_params, _flatten_dict  # part of pytorch-lightning
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from visionsweep.callbacks.hparams import job_params
from visionsweep.errors import ConfigError

MLFLOW_MISSING = "logger=mlflow needs mlflow: pip install -e '.[dashboards]'"

# --------------------------------------------------------------------------------------- TensorBoard

# writers kept open after a finalize (a test may still follow); closed when the next job's logger
# starts or at exit, so a long in-process sweep does not hold one open file per job
_open_writers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_open_writers):
        writer.close()
    _open_writers.clear()


class SweepTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose event file feeds the HParams tab and holds the test metrics too.

    Args:
        arch: The backbone name, an HParams column.
        aug: The augmentation preset, an HParams column.
        seed: The job's seed, an HParams column.
        *args: Passed to :class:`~pytorch_lightning.loggers.TensorBoardLogger`.
        **kwargs: Passed to :class:`~pytorch_lightning.loggers.TensorBoardLogger`
            (``default_hp_metric`` defaults to False: no ``hp_metric=-1`` placeholder scalar).
    """

    def __init__(self, *args: Any, arch: Any = None, aug: Any = None, seed: Any = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)
        _close_open_writers()  # a new job: the previous one's test phase is over
        self.job = job_params(arch, aug, seed)
        self._session_started = self._session_ended = False

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, metrics: dict[str, Any] | None = None,
                        step: int | None = None) -> None:
        """Record the model's arguments plus the job's labels (hparams.yaml) and start the session."""
        super().log_hyperparams({**_convert_params(params), **self.job}, metrics, step)
        self._start_session()

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalars (starting the session first if no hyper-parameters were logged)."""
        self._start_session()
        super().log_metrics(metrics, step)

    def _start_session(self) -> None:
        # Only the session start info, no experiment summary: TensorBoard then takes its metric
        # columns from the run's scalar tags (val/acc, test/acc, …, their last values: the final
        # metrics) and its hparam columns from all the sessions together.
        if self._session_started:
            return
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb  # (no TensorFlow needed)

        values = {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in self.job.items() if v is not None}
        # trial_id: each run its own session group (without it, runs of equal hparams would share one row)
        writer = self.experiment._get_file_writer()
        writer.add_summary(hparams_pb(values, trial_id=str(self.log_dir), start_time_secs=time.time()))
        self._session_started = True

    def _write_plugin_data(self, tag: str, data: Any) -> None:
        """One HParams plugin summary into the scalars' event file (the session's end: tensorboard's own
        ``session_end_pb`` needs TensorFlow)."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import metadata

        data.version = metadata.PLUGIN_DATA_VERSION
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()))
        self.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, metadata=meta)]))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush without closing: ``trainer.test`` after ``trainer.fit`` logs into the same event file."""
        if self._experiment is None:
            return
        if not self._session_ended and self._session_started:
            from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

            ok = status in ("success", "finished")
            end = plugin_data_pb2.SessionEndInfo(
                status=api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE, end_time_secs=time.time())
            self._write_plugin_data(metadata.SESSION_END_INFO_TAG,
                                    plugin_data_pb2.HParamsPluginData(session_end_info=end))
            self._session_ended = True
        self.experiment.flush()
        _open_writers.add(self.experiment)
        if status == "success":
            self.save()  # hparams.yaml


# ------------------------------------------------------------------------------------------ MLflow

def _require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(MLFLOW_MISSING) from None


class SweepMLFlowLogger(MLFlowLogger):
    """MLFlowLogger: one experiment per sweep, runs named and tagged by arch / aug / seed.

    Args:
        arch: The backbone name (tag and param ``arch``).
        aug: The augmentation preset (tag and param ``aug``).
        seed: The job's seed (tag and param ``seed``).
        run_dir: The job's run dir (tag ``run_dir`` and the run's description).
        task: The task name, first part of the experiment name.
        labels: Free-form tags of the run (``tags`` of the config), joined in tag ``tags``.
        experiment_name: A training job's config names it (:func:`visionsweep.run_config.label_loggers`:
            ``<task>-<sweep stamp>`` in a sweep, ``<task>`` for a single run); None: ``task``.
        run_name: A training job's config names it ``<arch>-<aug>-seed<seed>[-job<n>]``; None: MLflow's.
        **kwargs: Passed to :class:`~pytorch_lightning.loggers.MLFlowLogger`.

    Raises:
        ConfigError: mlflow is not installed (one line naming the install command).
    """

    def __init__(self, arch: Any = None, aug: Any = None, seed: Any = None, run_dir: str | None = None,
                 task: str = "train", labels: Any = None, experiment_name: str | None = None,
                 run_name: str | None = None, **kwargs: Any) -> None:
        _require_mlflow()
        tags = {"arch": str(arch), "aug": str(aug), "seed": str(seed), **dict(kwargs.pop("tags", None) or {})}
        if run_dir:
            tags.update({"run_dir": str(run_dir), "mlflow.note.content": f"Run dir: `{run_dir}`"})
        if labels:
            tags["tags"] = ",".join(str(t) for t in labels)
        with _store_lock(kwargs.get("tracking_uri")):  # MlflowClient may create the store's tables
            super().__init__(experiment_name=experiment_name or task, run_name=run_name,
                             tags=tags, **kwargs)
        self.job = job_params(arch, aug, seed, all_overrides=True)
        self._logged: dict[str, str] = {}

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The MlflowClient, with the sweep's experiment made first (its jobs may start together)."""
        if not self._initialized and self._experiment_id is None and self._run_id is None:
            self._experiment_id = _ensure_experiment(
                self._mlflow_client, self._tracking_uri, self._experiment_name, self._artifact_location)
        return super().experiment

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Log the model's arguments and the job's overrides, each key once.

        MLflow refuses to change a param, and Lightning logs the model's arguments again at test.
        """
        flat = _flatten_dict({**_convert_params(params), **self.job})
        new = {k: v for k, v in flat.items() if k not in self._logged}
        if new:
            super().log_hyperparams(new)
            self._logged.update({k: str(v) for k, v in new.items()})

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        """Log metrics; the job's params go first if Lightning logged no hyper-parameters."""
        if not self._logged:
            self.log_hyperparams({})
        super().log_metrics(metrics, step)


@contextlib.contextmanager
def _store_lock(tracking_uri: str | None) -> Iterator[None]:
    """Hold a file lock next to a sqlite store: its creation (schema migrations) and the sweep's
    experiment are made by whichever job of a parallel launcher comes first, never by two at once."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db.with_name(db.name + ".lock")):
        yield


def _ensure_experiment(client: Any, tracking_uri: str, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if it does not exist yet."""
    with _store_lock(tracking_uri):
        for attempt in range(3):
            expt = client.get_experiment_by_name(name)
            if expt is not None and expt.lifecycle_stage != "deleted":
                return expt.experiment_id
            try:
                return client.create_experiment(name=name, artifact_location=artifact_location)
            except Exception:  # made meanwhile by a process that takes no lock (a server, a notebook)
                if attempt == 2:
                    raise
                time.sleep(0.5)
    raise AssertionError("unreachable")
