"""``python -m visionsweep.report [SWEEP_DIR ...] [--metric val/acc_best] [--out DIR] [--reliability LABEL]``.

A report is a read-only view of finished runs, so this entry point takes plain paths (what users
type after a sweep) rather than Hydra overrides, and writes into the sweep dir itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionsweep.errors import VisionSweepError
from visionsweep.utils.cli import fail


SHOWN_COSTS = ("params", "latency_ms", "train_s", "time_to_target_s", "pareto")


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
    parser.add_argument("--reliability", metavar="LABEL",
                        help="configuration shown beside the best one in reliability.png (default: highest test/ece)")
    args = parser.parse_args(argv)
    paths = args.paths or [newest_sweep()]
    from visionsweep.report import build_report, render

    try:
        result = build_report(paths, args.out, args.metric, args.title, args.reliability)
    except VisionSweepError as e:
        fail(str(e))
    header, cells = render.table(result["rows"])
    # the configuration, its replicates, the ranking metric and the costs some job recorded
    keep = [i for i, h in enumerate(header) if i < 4 or h.startswith(f"{result['metric']} (")
            or (h in SHOWN_COSTS and any(c[i] not in ("—", "") for c in cells))]
    print(render.markdown_table([header[i] for i in keep], [[c[i] for i in keep] for c in cells]))
    if result["failed"]:
        print(f"\n{len(result['failed'])} failed job(s): " + ", ".join(result["failed"]), file=sys.stderr)
    out = Path(result["files"][0]).parent
    print(f"\nreport ({result['metric']}): {out / 'report.html'}  (+ summary.csv, summary.md, PNGs)")


if __name__ == "__main__":
    main()
