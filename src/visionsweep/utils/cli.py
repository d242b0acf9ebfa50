"""Entry-point plumbing: one clear line and exit code 2 for every error a user can cause.

Hydra prints composition errors over several lines (with a hint about HYDRA_FULL_ERROR) and exits
with 1; we compose the user's overrides once ourselves first, so a typo gets one line instead.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from visionsweep.errors import ConfigError, VisionSweepError, exception_chain

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # visionsweep/conf: the repo's conf/ (a link), or the wheel's copy
log = logging.getLogger("visionsweep")


def fail(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr and exit with code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def user_error(exc: BaseException) -> VisionSweepError | None:
    """The user-fixable error hidden in ``exc`` (also inside DataLoader workers and Hydra wrappers)."""
    for seen in exception_chain(exc):
        if isinstance(seen, VisionSweepError):
            msg = str(seen)
            if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the last line
                msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
            return type(seen)(msg)
        if isinstance(seen, MissingMandatoryValue):
            key = getattr(seen, "full_key", "") or "a value"
            return ConfigError(f"{key} is required: set it on the command line ({key}=...)")
    return None


def guarded(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra task so that user errors end in one line and exit code 2.

    In a multirun a failing job must not stop the sweep: it returns None, its error is logged for
    humans and recorded in its run.json (``status: failed``, ``error``, ``error_type``) for the report
    and the sweep's ledger.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        from visionsweep.runinfo import failure, remove_if_only_hydra_files

        try:
            return task(cfg)
        except KeyboardInterrupt:  # (train records its own interrupt and exits 130 itself)
            print("\ninterrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except SystemExit as e:  # Lightning's SIGTERMException (exit code None: 0) in eval & co: 128 + SIGTERM
            if type(e).__name__ == "SIGTERMException":  # (itself: train's own exit 143 chains to one)
                print("\ninterrupted (SIGTERM)", file=sys.stderr, flush=True)
                sys.exit(143)
            raise
        except Exception as e:
            err, recorded = user_error(e), failure(e)
            if is_multirun():
                # the sweep goes on; a bug (not a user error) keeps its traceback in the job's log
                log.error("job failed: %s", recorded["error"], exc_info=err is None)
                _record_failure(cfg, recorded)
                return None
            _record_failure(cfg, recorded, create=False)  # a run.json already written says "failed"
            if err is None:
                raise
            remove_if_only_hydra_files(_output_dir())  # a bad path or value leaves no half-made run dir
            fail(str(err))

    return wrapper


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _record_failure(cfg: DictConfig, recorded: dict[str, str], create: bool = True) -> None:
    """Mark the job's run.json ``failed`` with the error, unless the task did so itself (train.py).

    A job that failed before writing run.json gets a new one if ``create`` (a sweep job: the ledger
    and the report read it); a single run then leaves no run dir instead.
    """
    from hydra.core.hydra_config import HydraConfig

    from visionsweep import runinfo

    # rank 0 owns run.json (a failing DDP rank must not race it). Only a process that has loaded
    # Lightning can be a rank > 0: a rank's job imports it before anything it runs can fail.
    if "pytorch_lightning" in sys.modules:
        from visionsweep import distributed

        if not distributed.is_rank_zero():
            return
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
        existing = runinfo.load(out)
        if existing.get("status") == runinfo.Status.FAILED:
            return
        if existing:
            runinfo.RunRecord.unsaved(out, **existing).fail(**recorded)
        elif create:
            runinfo.RunRecord(out, task=cfg.get("task_name"),
                              overrides=list(HydraConfig.get().overrides.task)).fail(**recorded)
    except Exception as e:  # never mask the job's own error
        log.warning("could not record the failure in run.json: %s", e)


def is_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def expand_home(argv: list[str]) -> list[str]:
    """``key=~/x`` (and ``key=~``) with the home folder written out, as a shell would have done.

    Hydra's override lexer rejects an unquoted ``~``, so ``data.root=~/photos`` (what users type, and
    what the README shows) would fail; any override value that starts with ``~`` is expanded, as are
    the items of a sweep list (``data.root=~/a,~/b``). The result is quoted when needed (a home with
    spaces). A ``~`` elsewhere (``~key`` deletes a key in Hydra) is left as it is.

    Args:
        argv: Command-line arguments after the program name.

    Returns:
        The arguments, expanded.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key and not key.startswith(("-", "~")) and value.startswith("~"):
            items = value.split(",") if not re.search(r"[\[\](){}'\"]", value) else [value]
            value = ",".join(_quoted(os.path.expanduser(v)) if v.startswith("~") else v for v in items)
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


def _quoted(value: str) -> str:
    if re.fullmatch(r"[\w./@:+-]*", value) and "~" not in value:
        return value  # a plain path: Hydra takes it unquoted
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def yaml_error_message(exc: BaseException) -> str | None:
    """A one-line message naming file and line of a YAML syntax error in ``exc``'s chain, else None.

    Args:
        exc: What composing (or loading a config) raised; Hydra passes PyYAML's error through.

    Returns:
        E.g. ``YAML syntax error in '/x/experiment/bad.yaml' line 3: expected ',' or ']' ...: fix the file``.
    """
    import yaml

    for seen in exception_chain(exc):
        if isinstance(seen, yaml.MarkedYAMLError):
            mark = seen.problem_mark or seen.context_mark
            where = f"'{mark.name}' line {mark.line + 1}" if mark is not None else "a config file"
            what = " ".join(f"{seen.problem or ''} ({seen.context})".split()) if seen.context else seen.problem
            return f"YAML syntax error in {where}: {what or type(seen).__name__}: fix the file"
        if isinstance(seen, yaml.YAMLError):
            return f"YAML error in a config file: {_first_line(seen)}: fix the file"
    return None


def precheck(config_name: str, argv: list[str] | None = None) -> None:
    """Compose ``config_name`` with the command line's overrides and fail in one line if that fails.

    First expands ``~`` in override values (:func:`expand_home`), in ``sys.argv`` itself (or in
    ``argv``, in place) so that Hydra parses the expanded values too. Skipped for Hydra's own flags
    (``--help``, ``--cfg``...) and for sweeps it cannot expand (Optuna ranges): Hydra reports those
    itself. With ``--config-dir`` / ``--config-name`` only YAML syntax errors are reported here.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if argv is None:
        sys.argv[1:] = expand_home(sys.argv[1:])
    else:
        argv[:] = expand_home(argv)
    quiet_libraries()
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if any([args.help, args.hydra_help, args.cfg, args.info, args.shell_completion, args.experimental_rerun]):
        return
    if args.config_dir or args.config_name:
        _precheck_yaml(args.config_dir, args.config_name or config_name, args.overrides)
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as e:
        fail(f"bad override: {_first_line(e)}")
    if not args.multirun:
        _check_run_dir(config_name, parsed)
    jobs = [args.overrides]
    if args.multirun:
        try:
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        except Exception:
            return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in jobs:
            try:
                compose(config_name, overrides=list(overrides))
            except Exception as e:
                fail(yaml_error_message(e) or _describe_compose_error(e, overrides))


def _check_run_dir(config_name: str, parsed: list[Any]) -> None:
    """``hydra.run.dir=<a dir holding a run>``: one line before Hydra writes its ``.hydra/`` files there.

    Allowed with ``overwrite=true``, and for a training run that resumes a checkpoint of that dir.
    """
    from visionsweep.utils.atomic import check_run_dir

    given = {o.key_or_group: o.value() for o in parsed if not o.is_delete()}
    run_dir = given.get("hydra.run.dir")
    if not run_dir:
        return
    path = Path(os.path.expanduser(str(run_dir)))
    resumes, ckpt = None, given.get("ckpt_path")
    try:
        if config_name == "train" and ckpt not in (None, ""):
            from visionsweep.checkpoints import find_latest

            log_dir = given.get("paths.log_dir", "runs")
            resumes = find_latest(log_dir) if ckpt == "latest" else Path(os.path.expanduser(str(ckpt)))
    except ConfigError:
        pass  # no checkpoint to resume: the run dir check below decides
    try:
        check_run_dir(path, overwrite=str(given.get("overwrite", "false")).lower() == "true", resumes=resumes)
    except ConfigError as e:
        fail(str(e))


def _precheck_yaml(config_dir: str | None, config_name: str, overrides: list[str]) -> None:
    """Compose as Hydra will (``config_dir`` first on the search path); fail only on YAML syntax errors.

    Other errors are left to Hydra: a config dir may hold a saved run config that our own root
    configs' checks do not apply to.
    """
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    search_path = create_config_search_path(str(CONF_DIR))
    if config_dir:
        if not Path(config_dir).is_dir():
            fail(f"--config-dir '{config_dir}' is not a folder: give the folder that holds the configs")
        search_path.prepend(provider="command-line", path=f"file://{Path(config_dir).resolve()}")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        sweep = any(o.is_sweep_override() for o in parsed)
    except Exception:
        return  # Hydra reports a bad override itself
    try:
        hydra = Hydra.create_main_hydra2(task_name=config_name, config_search_path=search_path)
        hydra.compose_config(config_name, list(overrides), run_mode=RunMode.MULTIRUN if sweep else RunMode.RUN)
    except Exception as e:
        message = yaml_error_message(e)
        if message:
            fail(message)
    finally:
        GlobalHydra.instance().clear()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# launchers whose Hydra plugin an optional extra installs (pyproject.toml)
EXTRA_LAUNCHERS = {"ray": "ray", "ray_aws": "ray"}


def _describe_compose_error(e: Exception, overrides: list[str]) -> str:
    text = str(e)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, choice = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        close = difflib.get_close_matches(choice, options, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        if group == "hydra/launcher" and choice in EXTRA_LAUNCHERS:  # a plugin of an extra not installed
            hint = f" (it comes with the {EXTRA_LAUNCHERS[choice]!r} extra: pip install -e '.[{EXTRA_LAUNCHERS[choice]}]')"
        return f"bad override '{group}={choice}': no such {group}{hint}; available: {', '.join(options)}"
    key = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)'", text)
    if key and isinstance(e.__cause__, OmegaConfBaseException) or "not in struct" in text:
        name = key.group(1) if key else "?"
        return f"bad override '{name}': no such key in the config (add it with +{name}=... if intended)"
    return f"bad override ({' '.join(overrides)}): {_first_line(e)}"


# What a run prints: our config tree, Lightning's progress bar and our summary line, not library chatter.
# Only messages known to be noise are silenced, each by its text, so a real warning still shows:
# Lightning's litlogger advert, the LeafSpec deprecation Lightning triggers inside torch (not ours to
# fix), wandb's offline hints, and onnxscript's INFO lines during export.
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


PRINT_ORDER = ("data", "augmentation", "model", "optimizer", "scheduler", "trainer", "logger",
               "callbacks", "paths")


def print_config_tree(cfg: DictConfig, resolve: bool = True) -> None:
    """Print the composed config as a rich tree, main groups first.

    Args:
        cfg: the composed config.
        resolve: resolve interpolations before printing.
    """
    import rich
    import rich.syntax
    import rich.tree
    from omegaconf import OmegaConf

    tree = rich.tree.Tree("CONFIG", style="bold")
    keys = [k for k in PRINT_ORDER if k in cfg] + [k for k in cfg if k not in PRINT_ORDER]
    for key in keys:
        branch = tree.add(str(key), style="bold cyan")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) or \
            OmegaConf.is_list(node) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)
