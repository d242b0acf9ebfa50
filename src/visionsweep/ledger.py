"""A sweep dir as a ledger: what each numbered job dir says it is (ok / failed / pruned / running).

Each job's run.json carries ``status`` and ``config_hash``, the hash of its composed config without
what says *where* or *how* it runs rather than *what* it computes (``hydra``, ``paths``, ``ckpt_path``,
``threads``, ``gpus``). A sweeper re-running the same command reads this ledger first: ok + same hash → skip,
running (the sweep died) → resume from the job's own last.ckpt, failed / missing → run again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

# keys that never change what a job computes: where it writes, which launcher, its threads and GPUs
EXCLUDED = ("hydra", "paths", "ckpt_path", "threads", "gpus")
LEDGER_FILE = "ledger.json"
# errors a job records when it is stopped from outside rather than failing by itself
INTERRUPTS = ("KeyboardInterrupt", "SystemExit", "Interrupted", "SIGTERM")


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
        status: ok | failed | pruned | running | missing (no run.json yet).
        config_hash: the hash its run.json recorded (None for runs from before hashes).
        last_ckpt: its checkpoints/last.ckpt when there is one.
        error: the error its run.json recorded, if any.
    """

    num: int
    status: str
    config_hash: str | None
    last_ckpt: Path | None
    error: str | None = None

    @property
    def interrupted(self) -> bool:
        """The job was stopped from outside: killed (still ``running``), Ctrl-C or SIGTERM."""
        if self.status in ("running", "interrupted"):
            return True
        return self.status == "failed" and str(self.error or "").startswith(INTERRUPTS)


def job_entry(job_dir: Path, num: int) -> JobEntry:
    """Read one job dir's run.json (an unreadable or absent one counts as missing)."""
    try:
        run = json.loads((job_dir / "run.json").read_text())
    except (OSError, ValueError):
        run = {}
    last = job_dir / "checkpoints" / "last.ckpt"
    return JobEntry(num, str(run.get("status") or "missing"), run.get("config_hash"),
                    last if last.is_file() else None, run.get("error"))


def saved_config(job_dir: Path) -> dict[str, Any] | None:
    """The composed config Hydra saved in ``<job>/.hydra/config.yaml`` (None without one)."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(view, indent=2))
    tmp.replace(path)
    return path
