"""Merge one finished run in every dtype and compare: logit error, top-1 agreement, time, size.

    python scripts/export_precision.py runs/quickstart [--out /tmp/export-precision]

float32 is the baseline measured in the same run; other dtypes are shown as ratios against it.
The numbers are those `peftvlm export --merge` writes to export_report.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/export-precision"),
                        help="where the merged folders go (one per dtype)")
    args = parser.parse_args()

    from peftvlm.export import DTYPES, export_run

    # Warm-up (imports, data cache, first model load) so float32 is not charged for it.
    export_run(args.run_dir, merge=True, out=args.out / "warmup", log=lambda message: None)
    rows = {}
    for dtype in DTYPES:
        started = time.perf_counter()
        report = export_run(args.run_dir, merge=True, dtype=dtype, out=args.out / dtype,
                            log=lambda message: None)
        logits = report["checks"]["logits"]
        rows[dtype] = {"seconds": time.perf_counter() - started, "diff": logits["max_abs_diff"],
                       "tolerance": logits["tolerance"], "top1": logits["top1_agreement"],
                       "bytes": folder_size(args.out / dtype)}
    base = rows["float32"]
    print(f"{'dtype':10} {'max|diff|':>10} {'tolerance':>10} {'top-1':>6} {'time s':>7} "
          f"{'x fp32':>7} {'size MB':>8} {'x fp32':>7}")
    for dtype, r in rows.items():
        print(f"{dtype:10} {r['diff']:10.2e} {r['tolerance']:10.2e} {r['top1']:6.3f} "
              f"{r['seconds']:7.2f} {r['seconds'] / base['seconds']:7.2f} "
              f"{r['bytes'] / 1e6:8.2f} {r['bytes'] / base['bytes']:7.2f}")


if __name__ == "__main__":
    main()
