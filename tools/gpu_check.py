#!/usr/bin/env python3
"""The GPU check on an air-gapped GPU machine (``make gpu-check``), from the wheels of ``make gpu-wheels``.

Standard library only: it runs before anything of ours is installed.

Run by the interpreter that already holds torch, e.g. on the GPU machine, no network: installs ``--wheels``
alone (``pip install --no-index --no-deps --target <temporary prefix>``: nothing system-wide, no dependency
resolution), imports the stack from ``<prefix>:src``, runs ``pytest -m gpu`` and the GPU lines of
``benchmarks/bench.py --full`` (``step`` and ``e2e``; skipped without CUDA), and writes ``gpu-check.json``
and ``gpu-check.log`` into ``--out`` (default ``runs/gpu-check/``). Exit 0 when nothing failed (GPU tests
skipped for want of CUDA count as not failed; the JSON says they were skipped and why). The wheels come
from ``tools/gpu_wheels.py``.

    python tools/gpu_check.py --wheels .whl --out runs/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # run by path it is there already (not under -P, -I)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import MUST_IMPORT, REPO, Tee, run  # noqa: E402

BENCH_GPU = ("step", "e2e")  # the sections of benchmarks/bench.py that are GPU lines with --full


def bench_skip() -> str:
    """``--skip`` for bench.py: every section of its ``SECTIONS`` but the GPU lines (read, not imported)."""
    import ast

    tree = ast.parse((REPO / "benchmarks" / "bench.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SECTIONS" for t in node.targets):
            return ",".join(s for s in ast.literal_eval(node.value) if s not in BENCH_GPU)
    raise RuntimeError("benchmarks/bench.py has no SECTIONS tuple")


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
    """``make gpu-check``: install, probe the imports, ``pytest -m gpu``, the bench lines; write the report."""
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
    """Command line (a leading ``check``, the subcommand this script once had, is accepted and dropped)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv[:1] == ["wheels"]:
        p.error("the wheels are made by tools/gpu_wheels.py now (make gpu-wheels)")
    p.add_argument("--wheels", default=str(REPO / ".whl"))
    p.add_argument("--out", default=str(REPO / "runs" / "gpu-check"))
    p.add_argument("--prefix", default=None, help="install here and keep it (default: a temporary folder, removed)")
    p.add_argument("--keep-prefix", action="store_true", help="keep the temporary prefix (its path is in the JSON)")
    p.add_argument("--tests", nargs="*", default=None, help="pytest paths (default: tests)")
    p.add_argument("--pytest-args", default="", help='more pytest arguments, one string: --pytest-args="-x -k amp"')
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole check (default 470: "
                   "under 8 min with the install); pytest and the bench lines are stopped at it")
    p.add_argument("--pytest-timeout", type=float, default=340.0, help="at most this for pytest -m gpu "
                   "(default 340: two cold torch.compile runs and three resume runs are the bulk)")
    p.add_argument("--bench-reserve", type=float, default=120.0, help="seconds of the budget kept for the bench "
                   "lines when there is a GPU (default 120)")
    p.add_argument("--bench-timeout", type=float, default=None, help="at most this for the bench lines "
                   "(default: the rest of the budget)")
    p.add_argument("--bench-args", default="", help='more bench.py arguments, one string: --bench-args="--e2e-models resnet34"')
    p.add_argument("--no-bench", action="store_true", help="skip the bench lines")
    return cmd_check(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
