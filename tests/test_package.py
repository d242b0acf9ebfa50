"""The wheel: built from the repo, installed into a fresh venv, it trains from an empty directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv holding only our wheel; the dependencies come from the test's own environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy of the files git knows, so the build's build/ and egg-info stay out of the repo
    listed = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, text=True)
    for rel in filter(None, listed.split("\0")):
        origin, copy = REPO / rel, src / rel
        if not origin.exists() and not origin.is_symlink():
            continue  # deleted in the work tree
        copy.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            os.symlink(os.readlink(origin), copy)
        else:
            shutil.copy2(origin, copy)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((tmp / "dist").glob("visionsweep-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # a path line, not a site dir: the repo's editable-install hook in there is not run
    (site / "stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.package
def test_the_wheel_ships_conf_and_experiments(wheel_venv, tmp_path):
    where = _run(wheel_venv, tmp_path, str(wheel_venv / "bin" / "python"), "-c",
                 "import visionsweep, pathlib; p = pathlib.Path(visionsweep.__file__).parent; "
                 "print(p); print((p / 'conf' / 'train.yaml').is_file(), (p / 'conf' / 'experiment' / 'quick.yaml').is_file())")
    lines = where.stdout.split()
    assert str(wheel_venv) in lines[0] and lines[1:] == ["True", "True"], where.stdout + where.stderr
    assert not (Path(lines[0]) / "conf").is_symlink()  # real files, not a link into a source tree


@pytest.mark.package
@pytest.mark.parametrize("extra", [[], ["experiment=quick"]], ids=["default", "experiment"])
def test_vs_train_from_an_empty_directory(wheel_venv, tmp_path, extra):
    proc = _run(wheel_venv, tmp_path, str(wheel_venv / "bin" / "vs-train"), *extra, "debug=fast")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 1 and (runs[0] / "run.json").is_file() and (runs[0] / ".hydra" / "config.yaml").is_file()
    assert "val/acc" in proc.stdout
