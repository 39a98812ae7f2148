"""How long `hat debug` takes on the quickstart: 64 val images through all five stages (and
qat_float, the default pair's reference: the QAT weights computed in float).

    .venv/bin/python bench/debug_speed.py [--workdir DIR] [--images 64] [--repeat 1]

`--workdir` is the folder `hat run recipes/quickstart.toml` ran in (default: the checkout): the
recipe's relative paths (`runs/`, `data/shapes`) are read from there, so it must hold a finished
quickstart run with its compiled artifact (`hat run recipes/quickstart.toml`, 3-4 minutes on 2
cores). The command runs `--repeat` times as a fresh process (`python -m hatcli debug ...`, plugin
loading and model building included); the median wall time is reported. Target: under 60 s on 2
cores. The last line is one JSON object with `seconds` (median wall time), `runs` (each run's),
`debug_seconds` (what debug.json records for the last run), `images`, `stages`, `layers`,
`target_s` and `target_met`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.toml"
TARGET_S = 60.0
STAGES = "float,calibration,qat,int_infer,deploy"


def main() -> int:
    """Run `hat debug` on the quickstart run `--repeat` times and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT, help="folder holding runs/quickstart and data/shapes")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    run = args.workdir / "runs" / "quickstart"
    if not (run / "compile").is_dir():
        print(f"no finished quickstart run in {args.workdir} (no {run / 'compile'}): run "
              f"`hat run {RECIPE}` there first", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "hatcli", "debug", str(RECIPE), "--stages", STAGES, "--images",
               str(args.images), "--json"]
    walls, data = [], {}
    for _ in range(args.repeat):
        tic = time.perf_counter()
        done = subprocess.run(command, cwd=args.workdir, capture_output=True, text=True)
        walls.append(time.perf_counter() - tic)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        data = json.loads(done.stdout)
    seconds = statistics.median(walls)
    summary = data["summary"]
    print(json.dumps({"seconds": round(seconds, 2), "runs": [round(w, 2) for w in walls],
                      "debug_seconds": summary["seconds"], "images": summary["images"],
                      "stages": summary["stages"].split(", "), "layers": summary["layers"], "target_s": TARGET_S,
                      "target_met": seconds < TARGET_S}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
