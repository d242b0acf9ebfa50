"""A sweep dir as a ledger: what each numbered job dir says it is (ok / failed / pruned / running).

Each job's run.json carries ``status`` and ``config_hash``, the hash of its composed config without
what says *where* or *how* it runs rather than *what* it computes (``hydra``, ``paths``, ``ckpt_path``,
``threads``, ``gpus``). A sweeper re-running the same command reads this ledger first: ok + same hash → skip,
running (the sweep died) → resume from the job's own last.ckpt, failed / missing → run again.
A damaged run.json (cut off, garbage, not an object, a status of the wrong type) makes the job ``damaged``:
it is run again, and the sweeper says so in one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from visionsweep.runinfo import STATUSES, Status
from visionsweep.utils.atomic import atomic_write

log = logging.getLogger(__name__)

# keys that never change what a job computes: where it writes, which launcher, its threads and GPUs, its PNGs
EXCLUDED = ("hydra", "paths", "ckpt_path", "threads", "gpus", "overwrite", "plots")
LEDGER_FILE = "ledger.json"
_JSON_KINDS = {list: "a JSON list", str: "a JSON string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read a JSON file that must hold an object (run.json, perf.json), telling damage from absence.

    Args:
        path: the file.

    Returns:
        ``(content, None)``; ``(None, None)`` when there is no such file; ``(None, problem)`` when it is
        damaged, ``problem`` naming the file and what is wrong (``runs/x/3/run.json is not valid JSON
        (Expecting value at line 1)``), for the caller to add what it does about it.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path} cannot be read ({e.strerror or e})"
    if not raw.strip():
        return None, f"{path} is empty"
    try:
        data = json.loads(raw.decode("utf-8"))  # strict: json.loads would guess UTF-16 from a BOM
    except UnicodeDecodeError as e:
        return None, f"{path} is not UTF-8 text (byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"{path} is not valid JSON ({str(e).split(' (char ')[0]})"  # what and where
    except RecursionError:
        return None, f"{path} is not valid JSON (nested too deep)"
    if not isinstance(data, dict):
        return None, f"{path} holds {_JSON_KINDS.get(type(data), type(data).__name__)}, not a JSON object"
    return data, None


def read_yaml(path: Path) -> tuple[Any, str | None]:
    """Read a YAML file (config.yaml, .hydra/overrides.yaml): ``(content, problem)`` as :func:`read_json_object`.

    The content can be of any type (None for an absent or empty file); callers check the shape they need.
    """
    try:
        text = path.read_bytes().decode("utf-8")  # strict: PyYAML would guess UTF-16 from stray bytes
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path} cannot be read ({e.strerror or e})"
    except UnicodeDecodeError as e:
        return None, f"{path} is not UTF-8 text (byte {e.start})"
    try:
        return yaml.safe_load(text), None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return None, f"{path} is not valid YAML" + (f" (line {mark.line + 1})" if mark else "")


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain data, unresolved (``${now:}`` / ``${hydra:}`` stay literal), minus EXCLUDED."""
    data = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: v for k, v in data.items() if k not in EXCLUDED and k != "defaults"}


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a job's composed config without the keys of ``EXCLUDED``.

    Args:
        cfg: the job's config (with or without its ``hydra`` node).

    Returns:
        The same string for the same job whoever composes it (sweeper or job, any machine).
    """
    text = json.dumps(_plain(cfg), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first dotted key where two configs differ, as ``key: old -> new`` (None when equal).

    Args:
        old: a config (DictConfig, dict, list or value).
        new: the other one.
        prefix: the dotted path of ``old`` / ``new`` (for recursion).
    """
    if isinstance(old, DictConfig) or isinstance(new, DictConfig):
        old, new = _plain(old) if isinstance(old, DictConfig) else old, _plain(new) if isinstance(new, DictConfig) else new
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if prefix == "" and (key in EXCLUDED or key == "defaults"):
                continue
            where = f"{prefix}{key}"
            if key not in old or key not in new:
                return f"{where}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
            diff = first_difference(old[key], new[key], f"{where}.")
            if diff:
                return diff
        return None
    if old != new:
        return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"
    return None


@dataclass
class JobEntry:
    """What a job dir of a sweep says about itself.

    Args:
        num: the job number (its dir name).
        status: a run.json :class:`~visionsweep.runinfo.Status`, or ``missing`` (no run.json yet) or
            ``damaged`` (one that cannot be trusted).
        config_hash: the hash its run.json recorded (None for runs from before hashes).
        last_ckpt: its checkpoints/last.ckpt when there is one.
        error: the error its run.json recorded, if any.
        error_type: its ``error_type``, if any.
        problem: what is wrong with a ``damaged`` job's run.json (names the file).
    """

    num: int
    status: Status | str
    config_hash: str | None
    last_ckpt: Path | None
    error: str | None = None
    problem: str | None = None
    error_type: str | None = None

    @property
    def interrupted(self) -> bool:
        """The job was stopped from outside: killed (still ``running``), Ctrl-C or SIGTERM (``interrupted``; a
        run.json from before ``interrupted`` existed recorded a SIGTERM as ``failed`` with that error type)."""
        return self.status in (Status.RUNNING, Status.INTERRUPTED) or (
            self.status == Status.FAILED and self.error_type == "SIGTERMException")


def job_entry(job_dir: Path, num: int) -> JobEntry:
    """Read one job dir's run.json: ``missing`` when absent, ``damaged`` (with ``problem``) when unusable."""
    last = job_dir / "checkpoints" / "last.ckpt"
    last_ckpt = last if last.is_file() else None
    run, problem = read_json_object(job_dir / "run.json")
    if run is None and problem is None:
        return JobEntry(num, "missing", None, last_ckpt)
    problem = problem or _entry_problem(job_dir / "run.json", run or {})
    if problem is not None or run is None:
        return JobEntry(num, "damaged", None, last_ckpt, problem=problem)
    error = run.get("error")
    return JobEntry(num, Status(run["status"]), run.get("config_hash"), last_ckpt, None if error is None else str(error),
                    error_type=str(run.get("error_type")) if run.get("error_type") else None)


def _entry_problem(path: Path, run: dict[str, Any]) -> str | None:
    """What makes a parsed run.json unusable for the ledger: a status or config hash it cannot trust."""
    status, digest = run.get("status"), run.get("config_hash")
    if status not in STATUSES:
        return f"{path} has status {_short(status)} (not one of {', '.join(STATUSES)})"
    if digest is not None and not isinstance(digest, str):
        return f"{path} has config_hash {_short(digest)} (not a string)"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def saved_config(job_dir: Path) -> dict[str, Any] | None:
    """The composed config Hydra saved in ``<job>/.hydra/config.yaml`` (None without one).

    A damaged one is None too, with a warning naming it: the job's config cannot be compared then.
    """
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    _, problem = read_yaml(path)  # strict UTF-8 and YAML first; OmegaConf then reads it as Hydra wrote it
    try:
        cfg = None if problem else OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        problem, cfg = f"{path} cannot be read by OmegaConf ({type(e).__name__})", None
    if problem is None and not isinstance(cfg, dict):
        problem = f"{path} holds a {type(cfg).__name__}, not a config mapping"
    if problem is not None:
        log.warning("%s: job %s's config was not compared with this sweep's", problem, job_dir.name)
        return None
    return cfg  # type: ignore[return-value]


def read(sweep_dir: str | Path) -> dict[int, JobEntry]:
    """The ledger of a sweep dir: job number → entry, for every numbered sub-folder."""
    root = Path(sweep_dir)
    if not root.is_dir():
        return {}
    return {int(p.name): job_entry(p, int(p.name)) for p in root.iterdir() if p.is_dir() and p.name.isdigit()}


def write(sweep_dir: str | Path, decisions: Mapping[int, str]) -> Path:
    """Write ``<sweep dir>/ledger.json``: per job its status and what this sweep run did with it.

    Args:
        sweep_dir: the sweep dir.
        decisions: job number → run | resume | skip.
    """
    root = Path(sweep_dir)
    entries = read(root)
    view = {str(n): {"status": e.status, "config_hash": e.config_hash, "action": decisions.get(n)}
            for n, e in sorted(entries.items())}
    path = root / LEDGER_FILE
    atomic_write(path, json.dumps(view, indent=2))
    return path
