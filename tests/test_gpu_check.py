"""``make gpu-wheels`` + ``make gpu-check`` on a CPU machine: the installer of the air-gapped GPU check.

The "GPU image" is a venv holding only what a bare PyTorch image holds (``tools/gpu_common.py``'s
``IMAGE_HAS`` and what those need), linked from this .venv instead of reinstalled; the check installs
everything else from the wheels alone, without network, and its GPU tests skip here (no CUDA).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO

LOCAL = f"{sys.version_info.major}.{sys.version_info.minor}"
FAKE_GPU_TEST = '''
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")
def test_gpu_check_own_probe():
    assert torch.ones(2, device="cuda").sum().item() == 2
'''


def _tool(name: str):
    """``tools/<name>.py`` as a module (it imports ``gpu_common`` from its own folder)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**more: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, **more)
    return env


def _link_image(gc, site: Path) -> None:
    """Symlink into ``site`` exactly the files of the image's packages (their closure, + pip) from this .venv."""
    names = list(gc.IMAGE_HAS) + ["pip"]
    image, _ = gc.closure(names, gc.marker_env(LOCAL))
    here = Path(metadata.distribution("torch").locate_file("")).resolve()

    def files(dist) -> set[str]:
        out = set()
        for f in dist.files or []:
            p = Path(dist.locate_file(f)).resolve() if ".." in f.parts else here / f
            try:
                out.add(p.relative_to(here).as_posix())
            except ValueError:
                pass  # scripts in bin/ and the like
        return out

    owned = set().union(*(files(d) for d in image.values()))
    foreign = set().union(*(files(d) for d in metadata.distributions()
                            if gc.canon(d.metadata["Name"] or "") not in image))
    dirs = lambda paths: {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}  # noqa: E731
    owned_dirs, foreign_dirs = dirs(owned), dirs(foreign)

    def link(rel: str) -> None:
        for child in sorted((here / rel).iterdir() if rel else here.iterdir()):
            r = f"{rel}/{child.name}" if rel else child.name
            if child.is_dir() and not child.is_symlink():
                if r in owned_dirs and r not in foreign_dirs:
                    (site / r).symlink_to(child)  # the whole package folder: nothing of another in it
                elif r in owned_dirs:
                    (site / r).mkdir()
                    link(r)  # a namespace shared with packages the image lacks: link file by file
            elif r in owned:
                (site / r).symlink_to(child)

    site.mkdir(parents=True)
    link("")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """Wheels for this Python: the repo's .whl/ when it was made for it, else downloaded now (index needed)."""
    repo = REPO / ".whl"
    manifest = repo / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("python_version") == LOCAL:
        return repo
    dest = tmp_path_factory.mktemp("whl")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_wheels.py"), "--python-version", LOCAL,
                           "--dest", str(dest)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dest


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A venv that holds only the GPU image's packages: its python."""
    tmp = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
    _link_image(_tool("gpu_wheels"), tmp / "site")
    py = tmp / "venv" / "bin" / "python"
    purelib = subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip()
    (Path(purelib) / "image.pth").write_text(f"import site; site.addsitedir({str(tmp / 'site')!r})\n")
    return py


@pytest.mark.package
def test_gpu_check_installs_from_the_wheels_alone_and_runs(wheels, image, tmp_path):
    gc = _tool("gpu_common")
    python = str(image)
    # the "image" lacks what the check has to bring, and has what it must not need
    bare = subprocess.run([python, "-c", "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not "
                           "None for m in ('torch', 'timm', 'pytest', 'pip', 'hydra', 'albumentations', 'optuna', "
                           "'wandb', 'mlflow', 'visionsweep')}))"], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert json.loads(bare.stdout) == {"torch": True, "timm": True, "pytest": True, "pip": True, "hydra": False,
                                       "albumentations": False, "optuna": False, "wandb": False, "mlflow": False,
                                       "visionsweep": False}, bare.stderr

    own = tmp_path / "gpu_tests" / "test_own_gpu_probe.py"  # one gpu test for sure, beside tests/'s own
    own.parent.mkdir()
    own.write_text(FAKE_GPU_TEST)
    out, site = tmp_path / "out", tmp_path / "site"
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={python}", f"GPU_WHEELS={wheels}",
                           f"GPU_CHECK_OUT={out}", f"ARGS=--prefix {site} --tests tests {own}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert (out / "gpu-check.log").stat().st_size > 0
    assert report["ok"] and report["install"]["ok"] and report["cuda_available"] is False

    # everything installed came from the wheels: one dist-info per wheel, nothing else
    shipped = {gc.wheel_name_version(w.name) for w in wheels.glob("*.whl")}
    installed = {(gc.canon(d.name.split("-")[0]), d.name[:-len(".dist-info")].split("-")[1])
                 for d in site.glob("*.dist-info")}
    assert installed == shipped
    assert {gc.canon(n) for n, _ in shipped} >= {"hydra-core", "omegaconf", "antlr4-python3-runtime", "albumentations",
                                                 "optuna", "segmentation-models-pytorch", "captum", "submitit"}
    assert not {gc.canon(n) for n, _ in shipped} & {"torch", "wandb", "mlflow", "numpy", "timm", "ray"}
    for mod, r in report["imports"].items():
        assert r["ok"], (mod, r)
        if mod in gc.MUST_IMPORT:
            assert r["file"].startswith(str(site)), (mod, r["file"])
    assert report["wandb_installed"] is False and report["mlflow_installed"] is False

    # the GPU tests were collected and skipped for want of CUDA, and the bench said so instead of running
    tests = {t["nodeid"]: t for t in report["tests"]}
    mine = next(t for n, t in tests.items() if n.endswith("test_own_gpu_probe.py::test_gpu_check_own_probe"))
    assert mine["outcome"] == "skipped" and "CUDA" in mine["reason"]
    assert all(t["outcome"] == "skipped" and t["reason"] for t in tests.values()), tests
    assert report["gpu_tests"].startswith("all skipped: no CUDA")
    assert report["bench"]["status"] == "skipped" and "no CUDA" in report["bench"]["reason"]

    # the stack works under the prefix without wandb and mlflow: a tiny logger=csv training run
    env = _env(PYTHONPATH=f"{site}{os.pathsep}{REPO / 'src'}", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    code = ("import importlib.util as u, hydra, albumentations, optuna, segmentation_models_pytorch, captum; "
            "assert u.find_spec('wandb') is None and u.find_spec('mlflow') is None; print(hydra.__file__)")
    probe = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.startswith(str(site)), probe.stderr[-3000:]
    run = subprocess.run([python, "-m", "visionsweep.train", "logger=csv", "debug=fast", "model=resnet18",
                          "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "ok"


def test_gpu_wheels_refuses_a_folder_with_wheels_it_did_not_write(tmp_path):
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "mine-1.0-py3-none-any.whl").write_text("my own build")
    (dest / "ours-2.0-py3-none-any.whl").write_text("an earlier download")
    (dest / "manifest.json").write_text(json.dumps({"wheels": [{"file": "ours-2.0-py3-none-any.whl"}]}))
    assert _tool("gpu_wheels").foreign_wheels(dest) == ["mine-1.0-py3-none-any.whl"]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_wheels.py"), "--python-version", LOCAL,
                           "--dest", str(dest)], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "mine-1.0-py3-none-any.whl" in proc.stdout + proc.stderr
    assert (dest / "mine-1.0-py3-none-any.whl").read_text() == "my own build"  # nothing deleted
