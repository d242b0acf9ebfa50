#!/usr/bin/env python3
"""The GPU check for air-gapped GPU machines: ``make gpu-wheels`` here, ``make gpu-check`` there.

Standard library only: ``check`` runs before anything of ours is installed.

``wheels`` (run by the local .venv's Python, where the package index is reachable): the dependency closure of
visionsweep's own requirements (importlib.metadata, markers evaluated for the target Python), minus the
closure of what a bare PyTorch GPU image already holds (:data:`IMAGE_HAS`), minus the optional loggers
(:data:`NOT_SHIPPED`: wandb, mlflow — the project runs without them), each pinned to the version installed
here, downloaded as wheels for ``--python-version`` (default 3.12) into ``--dest`` (default ``.whl/``),
one version per package, plus ``manifest.json``. A package published as an sdist only is built here into a
wheel when it is pure Python (else the command names it and stops).

``check`` (run by the interpreter that already holds torch, e.g. on the GPU machine, no network): installs
``--wheels`` alone (``pip install --no-index --no-deps --target <temporary prefix>``: nothing system-wide, no
dependency resolution), imports the stack from ``<prefix>:src``, runs ``pytest -m gpu`` and the GPU lines of
``benchmarks/bench.py --full`` (``step`` and ``e2e``; skipped without CUDA), and writes ``gpu-check.json``
and ``gpu-check.log`` into ``--out`` (default ``runs/gpu-check/``). Exit 0 when nothing failed (GPU tests
skipped for want of CUDA count as not failed; the JSON says they were skipped and why).

    python tools/gpu_check.py wheels --python-version 3.12 --dest .whl
    python tools/gpu_check.py check --wheels .whl --out runs/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What a bare PyTorch GPU image already holds (with whatever these need): never shipped as wheels.
IMAGE_HAS = (
    "torch", "torchvision", "pytorch-lightning", "lightning", "torchmetrics", "timm", "opencv-python-headless",
    "onnx", "onnxruntime", "onnxscript", "scikit-learn", "scipy", "matplotlib", "tensorboard", "safetensors",
    "huggingface-hub", "rich", "pyyaml", "numpy", "pandas", "pillow", "joblib", "filelock", "psutil", "tqdm",
    "pytest", "pytest-xdist", "pytest-timeout",
)
# Main dependencies that are optional in practice (a logger the run does not choose): not shipped, not needed.
NOT_SHIPPED = ("wandb", "mlflow", "mlflow-skinny", "mlflow-tracing", "ray")
# What must import from the prefix after the install (module: distribution).
MUST_IMPORT = {
    "hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
    "albumentations": "albumentations", "optuna": "optuna", "segmentation_models_pytorch":
    "segmentation-models-pytorch", "captum": "captum", "submitit": "submitit",
    "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher",
    "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
GPU_PYTHON_FULL = {"3.12": "3.12.3"}  # the GPU image's interpreter (for markers on python_full_version)
BENCH_GPU = ("step", "e2e")  # the sections of benchmarks/bench.py that are GPU lines with --full
SIZE_LIMIT = 60 * 1000 * 1000  # the source tree and .whl/ travel together, 64 MiB in all
NOISE = "is ignored: it is neither a file nor a directory"  # pip about this machine's file:// indexes


def bench_skip() -> str:
    """``--skip`` for bench.py: every section of its ``SECTIONS`` but the GPU lines (read, not imported)."""
    import ast

    tree = ast.parse((REPO / "benchmarks" / "bench.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SECTIONS" for t in node.targets):
            return ",".join(s for s in ast.literal_eval(node.value) if s not in BENCH_GPU)
    raise RuntimeError("benchmarks/bench.py has no SECTIONS tuple")


def canon(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """``(canonical name, version)`` of a wheel file name."""
    parts = Path(filename).name[:-len(".whl")].split("-")
    return canon(parts[0]), parts[1]


class Tee:
    """Lines to stdout and to the log file."""

    def __init__(self, path: Path | None) -> None:
        self.f = path.open("w", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            if self.f:
                self.f.write(line + "\n")
                self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def run(cmd: list[str], tee: Tee, timeout: float | None = None, **kw) -> tuple[int | None, list[str], float]:
    """Run ``cmd``; its output (stdout + stderr) goes to ``tee`` line by line.

    Returns ``(exit code or None on timeout, output lines, seconds)``; on timeout the whole process group is
    killed.
    """
    tee("$ " + " ".join(c if "\n" not in c else "'<script>'" for c in cmd))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True, **kw)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if NOISE not in line:
                tee(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        tee(f"# timed out after {timeout:.0f} s: killed")
    reader.join(timeout=10)
    return rc, lines, time.monotonic() - start


# ================================================================================ wheels (local .venv)
def _packaging():
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.markers import default_environment
        from pip._vendor.packaging.requirements import Requirement
    return Requirement, default_environment


def marker_env(python_version: str) -> dict[str, str]:
    """PEP 508 marker environment of the target interpreter (Linux x86_64 CPython ``python_version``)."""
    _, default_environment = _packaging()
    env = dict(default_environment())
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python_version != local:
        full = GPU_PYTHON_FULL.get(python_version, python_version + ".0")
        env.update(python_version=python_version, python_full_version=full, implementation_version=full)
    env.update(sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine="x86_64",
               implementation_name="cpython", platform_python_implementation="CPython")
    return env


def closure(roots: list[str], env: dict[str, str], stop: set[str] = frozenset()) -> tuple[dict, dict]:
    """Installed distributions reachable from the requirement strings ``roots`` (markers evaluated in
    ``env``), not walking into ``stop``.

    Returns ``({canonical name: Distribution}, {canonical name: Requirement not installed here})``.
    """
    from importlib import metadata

    Requirement, _ = _packaging()
    found: dict = {}
    absent: dict = {}
    done: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name, extras = canon(req.name), frozenset(req.extras)
        if name in stop or (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            absent[name] = req
            continue
        found[name] = dist
        for spec in dist.requires or []:
            r = Requirement(spec)
            if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                todo.append(r)
    return found, absent


def project_requirements() -> list[str]:
    """visionsweep's own requirements (no extras): from the installed metadata, else pyproject.toml."""
    from importlib import metadata

    try:
        reqs = metadata.requires("visionsweep") or []
        return [r for r in reqs if "extra ==" not in r.replace('"', "'").replace(" ", " ")
                and "extra==" not in r.replace(" ", "")]
    except metadata.PackageNotFoundError:
        import tomllib

        return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def plan(python_version: str) -> dict:
    """The wheels a bare GPU image lacks: ``{"ship": {name: (dist name, pin)}, "absent": [...], ...}``."""
    env = marker_env(python_version)
    skip = {canon(n) for n in (*IMAGE_HAS, *NOT_SHIPPED)}
    image, image_absent = closure(list(IMAGE_HAS), env)
    wanted, absent = closure(project_requirements(), env, stop=skip)
    ship = {}
    for name, dist in sorted(wanted.items()):
        if name not in image:
            ship[name] = f"{dist.metadata['Name']}=={dist.version}"
    for name, req in sorted(absent.items()):  # required for the target Python but not installed here
        if name not in image and name not in skip:
            ship[name] = str(req.name) + str(req.specifier)
    return {"ship": ship, "image": sorted(image), "image_absent_here": sorted(image_absent),
            "not_shipped": sorted(canon(n) for n in NOT_SHIPPED)}


def pip_download(specs: list[str], python_version: str, dest: Path, tee: Tee) -> tuple[int | None, str | None]:
    """``pip download`` the wheels of ``specs`` for CPython ``python_version`` on manylinux x86_64.

    Returns the exit code and, on failure, the requirement pip found no wheel for (when it says which).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "--progress-bar", "off", "--disable-pip-version-check"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    rc, lines, _ = run(cmd + ["-d", str(dest), *specs], tee)
    failed = next((m.group(1) for x in lines if (m := re.search(r"satisfies the requirement (\S+)", x))), None)
    return rc, failed


def build_pure_wheel(spec: str, dest: Path, tee: Tee) -> Path | None:
    """A wheel built here from the sdist of ``spec``, if it is pure Python (``*-none-any.whl``)."""
    with tempfile.TemporaryDirectory() as tmp:
        rc, _, _ = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                        "--progress-bar", "off", "-w", tmp, spec], tee)
        built = list(Path(tmp).glob("*.whl"))
        if rc != 0 or len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
            return None
        return Path(shutil.move(str(built[0]), dest / built[0].name))


def cmd_wheels(a: argparse.Namespace) -> int:
    tee = Tee(None)
    dest = Path(a.dest).resolve()
    p = plan(a.python_version)
    specs = list(p["ship"].values())
    tee(f"# {len(specs)} packages a bare GPU image lacks (Python {a.python_version}): {', '.join(specs)}")
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest))
    try:
        built, todo, no_wheel = [], list(specs), []
        while todo:  # pip stops at the first requirement without a wheel: set it aside, go on with the rest
            rc, failed = pip_download(todo, a.python_version, staging, tee)
            if rc == 0:
                break
            match = [s for s in todo if canon(re.split(r"[=<>!~\[; ]", s)[0]) == canon(re.split(r"[=<>!~\[; ]",
                                                                                          failed or "?")[0])]
            if not match:
                tee(f"error: pip download failed (exit {rc}) for {todo}")
                return 2
            no_wheel.append(match[0])
            todo.remove(match[0])
        for spec in no_wheel:
            wheel = build_pure_wheel(spec, staging, tee)
            if wheel is None:
                tee(f"error: {spec} has no wheel for CPython {a.python_version} on manylinux x86_64 and its "
                    f"sdist does not build into a pure-Python wheel here: build it with Python "
                    f"{a.python_version} and put it into {dest}")
                return 2
            built.append(wheel.name)
            tee(f"# {spec}: sdist only on the index, built here into {wheel.name} (pure Python)")
        files = sorted(staging.glob("*.whl"))
        got = {}
        for f in files:
            name, version = wheel_name_version(f.name)
            if name in got:
                tee(f"error: two wheels for {name}: {got[name].name}, {f.name}")
                return 2
            got[name] = f
        if missing := set(p["ship"]) - set(got):
            tee(f"error: no wheel came for {sorted(missing)}")
            return 2
        for old in dest.glob("*.whl"):  # one version of each package, for this Python only
            old.unlink()
        for f in files:
            shutil.move(str(f), dest / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheels = []
    for f in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(f.name)
        wheels.append({"name": name, "version": version, "file": f.name, "bytes": f.stat().st_size,
                       **({"built_here": True} if f.name in built else {})})
    total = sum(w["bytes"] for w in wheels)
    manifest = {"python_version": a.python_version, "platforms": list(PLATFORMS), "total_bytes": total,
                "made": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wheels": wheels,
                "image_has": p["image"], "not_shipped": p["not_shipped"]}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for w in wheels:
        tee(f"  {w['name']:<34} {w['version']:<14} {w['bytes'] / 1e6:7.2f} MB" + "  (built here)" * ("built_here" in w))
    tee(f"# {len(wheels)} wheels, {total / 1e6:.1f} MB in {dest} for Python {a.python_version}")
    if total > SIZE_LIMIT:
        tee(f"warning: {dest} holds {total / 1e6:.1f} MB, over the {SIZE_LIMIT / 1e6:.0f} MB that travel with "
            f"the source tree")
    return 0


# ================================================================================ check (target machine)
PLUGIN = r'''
"""pytest plugin of tools/gpu_check.py: one JSON line per test phase, written as the tests run."""
import json, os

_F = None


def _w(rec):
    global _F
    if _F is None:
        _F = open(os.environ["GPU_CHECK_EVENTS"], "a", encoding="utf-8")
    _F.write(json.dumps(rec) + "\n")
    _F.flush()


def pytest_collectreport(report):
    if report.failed:
        _w({"event": "collect", "nodeid": report.nodeid, "outcome": "error",
            "message": str(report.longrepr)[-2000:]})


def pytest_runtest_logstart(nodeid, location):
    _w({"event": "start", "nodeid": nodeid, "file": location[0]})


def pytest_runtest_logreport(report):
    rec = {"event": report.when, "nodeid": report.nodeid, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if hasattr(report, "wasxfail"):
        rec["xfail"] = report.wasxfail or True
    if report.skipped and isinstance(report.longrepr, tuple):
        rec["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed:
        rec["message"] = str(report.longrepr)[-4000:]
    _w(rec)
'''


def tests_outcomes(events_file: Path) -> tuple[list[dict], list[dict]]:
    """Per-test outcomes (passed, failed, error, skipped, xfailed, xpassed, timeout) and collection errors."""
    tests: dict[str, dict] = {}
    collect = []
    if not events_file.exists():
        return [], []
    for line in events_file.read_text().splitlines():
        ev = json.loads(line)
        if ev["event"] == "collect":
            collect.append({"nodeid": ev["nodeid"], "message": ev.get("message", "")})
            continue
        if ev["event"] == "start":  # a file outside the rootdir has no path in its node id: add it
            nodeid = ev["file"] + ev["nodeid"] if ev["nodeid"].startswith("::") else ev["nodeid"]
            tests[ev["nodeid"]] = {"nodeid": nodeid, "outcome": "timeout", "seconds": 0.0}
            continue
        t = tests.setdefault(ev["nodeid"], {"nodeid": ev["nodeid"], "outcome": "timeout", "seconds": 0.0})
        t["seconds"] = round(t["seconds"] + ev.get("seconds", 0.0), 3)
        if ev["outcome"] == "skipped" and "xfail" in ev:
            t["outcome"], t["reason"] = "xfailed", str(ev["xfail"])
        elif ev["outcome"] == "passed" and "xfail" in ev and ev["event"] == "call":
            t["outcome"] = "xpassed"
        elif ev["outcome"] == "skipped":
            t["outcome"], t["reason"] = "skipped", ev.get("reason", "")
        elif ev["outcome"] == "failed":
            t["outcome"] = "failed" if ev["event"] == "call" else "error"
            t.setdefault("message", ev.get("message", ""))
        elif ev["event"] == "call" and t["outcome"] == "timeout":
            t["outcome"] = "passed"
        elif ev["event"] == "teardown" and t["outcome"] == "timeout":  # setup passed, no call: odd, keep
            t["outcome"] = "error"
    return list(tests.values()), collect


def install(wheels: list[Path], prefix: Path, env: dict, tee: Tee) -> tuple[bool, str, float]:
    """``pip install --no-index --no-deps --target prefix``, or unpack the wheels when pip is missing."""
    start = time.monotonic()
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, env=env).returncode == 0
    if has_pip:
        rc, lines, _ = run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
                            "--disable-pip-version-check", "--no-warn-script-location", "--progress-bar", "off",
                            "--target", str(prefix), *map(str, wheels)], tee, env=env)
        return rc == 0, "pip" if rc == 0 else "\n".join(lines[-5:]), time.monotonic() - start
    tee("# no pip in this interpreter: unpacking the wheels (purelib/platlib) into the prefix")
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(prefix)
        for data in prefix.glob("*.data"):
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    shutil.copytree(data / sub, prefix, dirs_exist_ok=True)
            shutil.rmtree(data)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(prefix)], env=env)
    return True, "unzip", time.monotonic() - start


PROBE = r'''
import importlib, importlib.util, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "imports": {}}
for mod in sys.argv[2:]:
    try:
        m = importlib.import_module(mod)
        f = getattr(m, "__file__", None) or list(getattr(m, "__path__", []) or [""])[0]
        out["imports"][mod] = {"ok": True, "file": f}
    except Exception as e:
        out["imports"][mod] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
for opt in ("wandb", "mlflow"):
    out[opt + "_installed"] = importlib.util.find_spec(opt) is not None
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if out["cuda_available"] else []
except Exception as e:
    out["torch"] = None
    out["torch_error"] = f"{type(e).__name__}: {e}"
    out["cuda_available"] = False
print("GPU_CHECK_PROBE " + json.dumps(out))
'''


def cmd_check(a: argparse.Namespace) -> int:
    start = time.monotonic()
    deadline = start + a.budget
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tee = Tee(out / "gpu-check.log")
    wheels_dir = Path(a.wheels).resolve()
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    report: dict = {"ok": False, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "python": sys.version.split()[0], "executable": sys.executable, "wheels_dir": str(wheels_dir),
                    "out": str(out)}

    def finish(ok: bool, problem: str | None = None) -> int:
        report["ok"] = ok
        if problem:
            report["problem"] = problem
            tee(f"error: {problem}")
        report["seconds"] = round(time.monotonic() - start, 1)
        (out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
        tee(f"# gpu-check {'ok' if ok else 'FAILED'} in {report['seconds']:.0f} s: {out / 'gpu-check.json'}, "
            f"{out / 'gpu-check.log'}")
        tee.close()
        return 0 if ok else 1

    wheels = sorted(wheels_dir.glob("*.whl"))
    manifest = wheels_dir / "manifest.json"
    made_for = json.loads(manifest.read_text()).get("python_version") if manifest.exists() else None
    report["wheels"] = [f.name for f in wheels]
    report["wheels_python"] = made_for
    if not wheels:
        return finish(False, f"no wheels in {wheels_dir}: run `make gpu-wheels GPU_PYTHON={local}` where the "
                             f"package index is reachable")
    if made_for and made_for != local:
        return finish(False, f"the wheels in {wheels_dir} are for Python {made_for}, this interpreter "
                             f"({sys.executable}) is {local}: run `make gpu-wheels GPU_PYTHON={local}`")

    # nothing from the network, nothing from pip's configuration (find-links, extra indexes, constraints)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONNOUSERSITE="1", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.setdefault("WANDB_MODE", "disabled")
    prefix = Path(a.prefix).resolve() if a.prefix else Path(tempfile.mkdtemp(prefix="visionsweep-gpu-site-"))
    prefix.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="visionsweep-gpu-check-"))  # pytest's events, bench's JSON lines
    report["prefix"] = str(prefix)
    try:
        tee(f"# installing {len(wheels)} wheels from {wheels_dir} into {prefix} (no index, no dependency resolution)")
        ok, how, secs = install(wheels, prefix, env, tee)
        report["install"] = {"ok": ok, "how": how if ok else None, "seconds": round(secs, 1)}
        if not ok:
            return finish(False, f"installing the wheels failed: {how}")
        pypath = [str(prefix), str(REPO / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(pypath)

        # 1. the stack imports, from the prefix
        mods = list(MUST_IMPORT) + ["visionsweep", "visionsweep.train", "hydra_plugins.visionsweep_basic",
                                    "hydra_plugins.visionsweep_optuna", "torch", "pytorch_lightning", "timm"]
        rc, lines, _ = run([sys.executable, "-c", PROBE, "--", *mods], tee, timeout=300, env=env, cwd=REPO)
        probe = next((json.loads(x.split(" ", 1)[1]) for x in lines if x.startswith("GPU_CHECK_PROBE ")), None)
        if probe is None:
            return finish(False, "the import probe did not run (see gpu-check.log)")
        report.update({k: v for k, v in probe.items() if k not in ("imports", "python", "executable")})
        report["imports"] = probe["imports"]
        bad = [m for m, r in probe["imports"].items() if not r["ok"]]
        outside = [m for m in MUST_IMPORT if probe["imports"][m]["ok"]
                   and not str(probe["imports"][m]["file"]).startswith(str(prefix) + os.sep)]
        cuda = bool(probe.get("cuda_available"))
        no_cuda = "no CUDA (torch.cuda.is_available() is False)"

        # 2. pytest -m gpu
        events = scratch / "pytest-events.jsonl"
        (prefix / "_gpu_check_plugin.py").write_text(PLUGIN)
        penv = {**env, "GPU_CHECK_EVENTS": str(events)}
        targets = a.tests or ["tests"]
        # one budget for the whole check: the bench lines keep their reserve when there is a GPU to run them
        left = deadline - time.monotonic()
        pytest_timeout = max(30.0, min(a.pytest_timeout, left - (a.bench_reserve if cuda and not a.no_bench else 0)))
        rc, lines, secs = run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "_gpu_check_plugin",
                               "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
                               "-q", "-rs", *shlex.split(a.pytest_args), *targets],
                              tee, timeout=pytest_timeout, env=penv, cwd=REPO)
        tests, collect_errors = tests_outcomes(events)
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        report["pytest"] = {"exit_code": rc, "seconds": round(secs, 1), "timeout_s": round(pytest_timeout),
                            "counts": counts, "collect_errors": collect_errors}
        report["tests"] = tests
        problems = []
        if bad:
            problems.append(f"cannot import {bad} ({'; '.join(probe['imports'][m]['error'] for m in bad)})")
        if outside:
            problems.append(f"{outside} imported from outside the prefix")
        if rc is None:
            problems.append(f"pytest -m gpu ran past {pytest_timeout:.0f} s (killed; --pytest-timeout, --budget)")
        elif rc == 5 or not tests:
            problems.append("pytest -m gpu collected no test (none marked gpu?)")
        elif rc != 0 or collect_errors or any(t["outcome"] in ("failed", "error", "xpassed") for t in tests):
            problems.append(f"pytest -m gpu: {counts}, {len(collect_errors)} collection error(s), exit {rc}")
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none collected"
        all_skipped = bool(tests) and counts.get("skipped") == len(tests)
        report["gpu_tests"] = f"all skipped: {no_cuda}" if all_skipped and not cuda else summary

        # 3. the GPU lines of make bench ARGS="--full"
        if a.no_bench:
            report["bench"] = {"status": "skipped", "reason": "--no-bench", "lines": []}
        elif not cuda:
            report["bench"] = {"status": "skipped", "reason": no_cuda, "lines": []}
            tee(f"# bench GPU lines skipped: {no_cuda}")
        else:
            jsonl = scratch / "bench.jsonl"
            bench_timeout = max(30.0, min(a.bench_timeout or float("inf"), deadline - time.monotonic()))
            cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--full", "--skip", bench_skip(),
                   "--out", str(jsonl), *shlex.split(a.bench_args)]
            rc, lines, secs = run(cmd, tee, timeout=bench_timeout, env=env, cwd=REPO)
            rows = []
            for x in lines:
                if x.startswith("{"):
                    try:
                        rows.append(json.loads(x))
                    except json.JSONDecodeError:
                        pass
            status = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
            report["bench"] = {"status": status, "exit_code": rc, "seconds": round(secs, 1),
                               "timeout_s": round(bench_timeout), "args": cmd[2:], "lines": rows}
            if status != "ok":
                problems.append(f"bench {status} (exit {rc}" + f", after {bench_timeout:.0f} s; --budget, --bench-timeout"
                                * (rc is None) + "; see gpu-check.log)")
        return finish(not problems, "; ".join(problems) or None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not a.keep_prefix and not a.prefix:
            shutil.rmtree(prefix, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="download the wheels a bare GPU image lacks (local .venv, index reachable)")
    w.add_argument("--python-version", default="3.12", help="the GPU image's Python, MAJOR.MINOR (default 3.12)")
    w.add_argument("--dest", default=str(REPO / ".whl"))
    c = sub.add_parser("check", help="install the wheels into a temporary prefix, run pytest -m gpu and the GPU bench")
    c.add_argument("--wheels", default=str(REPO / ".whl"))
    c.add_argument("--out", default=str(REPO / "runs" / "gpu-check"))
    c.add_argument("--prefix", default=None, help="install here and keep it (default: a temporary folder, removed)")
    c.add_argument("--keep-prefix", action="store_true", help="keep the temporary prefix (its path is in the JSON)")
    c.add_argument("--tests", nargs="*", default=None, help="pytest paths (default: tests)")
    c.add_argument("--pytest-args", default="", help='more pytest arguments, one string: --pytest-args="-x -k amp"')
    c.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450: "
                   "under 8 min with the start); pytest and the bench lines are stopped at it")
    c.add_argument("--pytest-timeout", type=float, default=300.0, help="at most this for pytest -m gpu (default 300)")
    c.add_argument("--bench-reserve", type=float, default=150.0, help="seconds of the budget kept for the bench "
                   "lines when there is a GPU (default 150)")
    c.add_argument("--bench-timeout", type=float, default=None, help="at most this for the bench lines "
                   "(default: the rest of the budget)")
    c.add_argument("--bench-args", default="", help='more bench.py arguments, one string: --bench-args="--e2e-models resnet34"')
    c.add_argument("--no-bench", action="store_true", help="skip the bench lines")
    a = p.parse_args(argv)
    return cmd_wheels(a) if a.cmd == "wheels" else cmd_check(a)


if __name__ == "__main__":
    sys.exit(main())
