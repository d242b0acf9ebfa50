#!/usr/bin/env python3
"""The wheels a bare PyTorch GPU image lacks, for the air-gapped GPU check (``make gpu-wheels``).

Run by the local .venv's Python, where the package index is reachable: the dependency closure of
visionsweep's own requirements (importlib.metadata, markers evaluated for the target Python), minus the
closure of what a bare PyTorch GPU image already holds (:data:`gpu_common.IMAGE_HAS`), minus the optional
loggers (:data:`gpu_common.NOT_SHIPPED`: wandb, mlflow — the project runs without them), each pinned to the
version installed here, downloaded as wheels for ``--python-version`` (default 3.12) into ``--dest``
(default ``.whl/``), one version per package, plus ``manifest.json``. A package published as an sdist only
is built here into a wheel when it is pure Python (else the command names it and stops).
``tools/gpu_check.py`` installs them on the GPU machine (``make gpu-check``).

    python tools/gpu_wheels.py --python-version 3.12 --dest .whl
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # run by path it is there already (not under -P, -I)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import IMAGE_HAS, NOT_SHIPPED, REPO, Tee, canon, run, wheel_name_version  # noqa: E402

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
GPU_PYTHON_FULL = {"3.12": "3.12.3"}  # the GPU image's interpreter (for markers on python_full_version)
SIZE_LIMIT = 60 * 1000 * 1000  # the source tree and .whl/ travel together, 64 MiB in all


def _packaging():
    """``(Requirement, default_environment)`` from ``packaging``, else from pip's vendored copy."""
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


def foreign_wheels(dest: Path) -> list[str]:
    """Wheels in ``dest`` that its ``manifest.json`` (written by an earlier run of this command) does not list."""
    try:
        ours = {w["file"] for w in json.loads((dest / "manifest.json").read_text()).get("wheels", [])}
    except (OSError, ValueError, TypeError, KeyError):
        ours = set()
    return sorted(f.name for f in dest.glob("*.whl") if f.name not in ours)


def cmd_wheels(a: argparse.Namespace) -> int:
    """``make gpu-wheels``: download (or build) the wheels into ``a.dest``, write its ``manifest.json``."""
    tee = Tee(None)
    dest = Path(a.dest).resolve()
    p = plan(a.python_version)
    specs = list(p["ship"].values())
    tee(f"# {len(specs)} packages a bare GPU image lacks (Python {a.python_version}): {', '.join(specs)}")
    if foreign := foreign_wheels(dest):  # never delete what this command did not write
        tee(f"error: {dest} holds wheels make gpu-wheels did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): give an empty folder, e.g. GPU_WHEELS=.whl-gpu")
        return 2
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


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--python-version``, ``--dest``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python, MAJOR.MINOR (default 3.12)")
    p.add_argument("--dest", default=str(REPO / ".whl"))
    return cmd_wheels(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
