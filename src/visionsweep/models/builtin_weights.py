"""Built-in "pretrained" weights, made once on first use: an offline stand-in for the hub's.

A ``model.pretrained_file`` named ``<backbone>_digits<a>-<b>.safetensors`` (or ``_digits<list>``, e.g.
``_digits0124679``) that does not exist yet is created the first time a run asks for it: ``<backbone>``
trained from scratch on the embedded digits of classes ``a``..``b`` (or the listed ones) at 32 px, then exported as a state dict (``python -m visionsweep.export
format=state_dict``). The fine-tune demo (``experiment=three_people``) pre-trains on digits 0-6 this
way and fine-tunes on 7, 8, 9, classes the weights have never seen.

Jobs of a sweep may ask at once: the first takes a lock file and builds, the others wait on the lock
and then find the file; the file appears by an atomic rename, so nobody reads half of one. The
pre-training run stays next to the file (``<stem>.run/``: config, metrics, run.json) as its record.

Also a command: ``python -m visionsweep.models.builtin_weights data/pretrained/resnet34_digits0-6.safetensors``
(``make pretrain``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from visionsweep.errors import ConfigError
from visionsweep.utils.atomic import atomic_write

log = logging.getLogger(__name__)

PATTERN = re.compile(r"^(?P<backbone>[A-Za-z0-9_.]+?)_digits(?P<spec>\d-\d|\d{2,10})\.safetensors$")
EPOCHS = 4  # ~1,100 images of 7 classes at 32 px: a few minutes of CPU


def recipe(path: str | Path) -> list[str] | None:
    """Training overrides that create ``path``, or None when its name is not a built-in one.

    Args:
        path: The wanted ``model.pretrained_file``.
    """
    m = PATTERN.match(Path(path).name)
    if not m:
        return None
    spec = m["spec"]
    digits = list(range(int(spec[0]), int(spec[2]) + 1)) if "-" in spec else sorted({int(c) for c in spec})
    if len(digits) < 2 or ("-" not in spec and len(digits) != len(spec)):
        return None
    classes = ",".join(str(c) for c in digits)
    # a fresh command line: the asking job's experiment and training choices do not reach it
    # no label smoothing: it makes features that transfer worse (Mueller et al. 2019, "When does label smoothing help?")
    return [f"model.backbone={m['backbone']}", "model.pretrained=false", "model.pretrained_file=null",
            "model.label_smoothing=0.0",
            "data=digits", "data.image_size=32", f"data.classes=[{classes}]", "data.test_fraction=0.0", "data.split_seed=0",
            "augmentation=light", "optimizer=adamw", "scheduler=onecycle",
            f"trainer.max_epochs={EPOCHS}", "trainer.enable_progress_bar=false",
            "test=false", "logger=csv", "seed=0"]


def _run(cmd: list[str], log_file: Path, what: str) -> None:
    with log_file.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise ConfigError(f"building the built-in pretrained file failed while {what} (exit {done.returncode}, "
                          f"log: {log_file}): fix the cause shown there, or pass another model.pretrained_file")


def ensure_weights(path: str | Path) -> bool:
    """Create a built-in pretrained file if it is missing (once, even with many jobs at once).

    Args:
        path: The wanted ``model.pretrained_file``.

    Returns:
        True when the file exists now; False when it is missing and its name is no built-in recipe.

    Raises:
        ConfigError: The pre-training or the export failed (the message names the log).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return True
    overrides = recipe(path)
    if overrides is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(path.with_name(path.name + ".lock")):  # one job of a sweep builds it, the others wait
        if path.is_file():  # another job built it while this one waited
            return True
        run, log_file = path.with_name(path.stem + ".run"), path.with_name(path.stem + ".log")
        shutil.rmtree(run, ignore_errors=True)  # a crashed earlier attempt
        log_file.unlink(missing_ok=True)
        log.info("model.pretrained_file %s is missing: pre-training it once (%d epochs, log %s)",
                 path, EPOCHS, log_file)
        start = time.perf_counter()
        # the asking job's thread budget (a sweep's jobs wait on the lock meanwhile)
        threads = os.environ.get("OMP_NUM_THREADS", "auto")
        _run([sys.executable, "-m", "visionsweep.train", *overrides, f"++threads={threads}", f"hydra.run.dir={run}"],
             log_file, "pre-training")
        record = json.loads((run / "run.json").read_text())
        ckpt = record.get("best_checkpoint") or str(run / "checkpoints" / "last.ckpt")
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.safetensors")
        try:
            _run([sys.executable, "-m", "visionsweep.export", f"ckpt_path={ckpt}", "format=state_dict",
                  f"output={tmp}", f"hydra.run.dir={run / 'export'}"], log_file, "exporting")
            meta = json.loads(tmp.with_suffix(".json").read_text())  # names the temporary file: point it at the final
            meta.update(path=str(path), use=str(meta.get("use", "")).replace(str(tmp), str(path)))
            atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2))
            os.replace(tmp, path)  # last: the file's existence means "complete"
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".json").unlink(missing_ok=True)
        acc = (record.get("metrics") or {}).get("val/acc_best")
        log.info("pre-trained %s in %.0f s (val/acc_best %s on its own classes)", path,
                 time.perf_counter() - start, acc)
        return True


def main(argv: list[str] | None = None) -> int:
    """``python -m visionsweep.models.builtin_weights <file> ...``: build the named built-in files."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = sys.argv[1:] if argv is None else argv
    if not files:
        print("usage: python -m visionsweep.models.builtin_weights data/pretrained/resnet34_digits0-6.safetensors",
              file=sys.stderr)
        return 2
    for file in files:
        try:
            if not ensure_weights(file):
                print(f"error: '{file}' is no built-in name: use <backbone>_digits<a>-<b>.safetensors, "
                      "e.g. resnet34_digits0-6.safetensors", file=sys.stderr)
                return 2
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
