"""``python -m visionsweep.report [SWEEP_DIR ...] [--metric val/acc_best] [--out DIR]``.

A report is a read-only view of finished runs, so this entry point takes plain paths (what users
type after a sweep) rather than Hydra overrides, and writes into the sweep dir itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionsweep.errors import VisionSweepError
from visionsweep.utils.cli import fail


def newest_sweep(log_dir: Path = Path("runs")) -> Path:
    """The most recent ``runs/<task>/multirun/<stamp>`` dir."""
    sweeps = [p for p in log_dir.glob("*/multirun/*") if p.is_dir()]
    if not sweeps:
        fail(f"no sweep under {log_dir}/*/multirun/: run one (make sweep) or give a sweep dir")
    return max(sweeps, key=lambda p: p.stat().st_mtime)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="python -m visionsweep.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="sweep dirs or run dirs (default: the newest sweep)")
    parser.add_argument("--metric", help="metric to rank by (default: val/acc_best, or val/miou for segmentation)")
    parser.add_argument("--out", type=Path, help="output folder (default: the first path)")
    parser.add_argument("--title", help="page title")
    args = parser.parse_args(argv)
    paths = args.paths or [newest_sweep()]
    from visionsweep.report import build_report, render

    try:
        result = build_report(paths, args.out, args.metric, args.title)
    except VisionSweepError as e:
        fail(str(e))
    header, cells = render.table(result["rows"])
    print(render.markdown_table(header[:4] + header[5:6], [c[:4] + c[5:6] for c in cells]))
    if result["failed"]:
        print(f"\n{len(result['failed'])} failed job(s): " + ", ".join(result["failed"]), file=sys.stderr)
    out = Path(result["files"][0]).parent
    print(f"\nreport ({result['metric']}): {out / 'report.html'}  (+ summary.csv, summary.md, PNGs)")


if __name__ == "__main__":
    main()
