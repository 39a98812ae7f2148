"""`python -m hatcli ARGS` runs the CLI exactly like the `hat` console script (`hatcli.main:main`).

The distributed launcher starts its workers this way (`torch.distributed.run ... -m hatcli ARGS`),
so a worker needs only the interpreter that launched it, no `hat` on PATH. A worker started by
`hat ... --nproc-per-node N` also leaves its exit code where the parent `hat` looks for it
(`hatcli.engine.distributed.run_launcher`), to say which processes failed.
"""

import os
import sys
from pathlib import Path

from hatcli.main import run_cli

STATUS_DIR_ENV = "HAT_LAUNCH_STATUS_DIR"  # = hatcli.engine.distributed.STATUS_DIR_ENV (kept torch-free here)


def report_exit(code: int) -> None:
    """In a worker of `hat ... --nproc-per-node N`, write this rank's exit code for the parent."""
    folder, rank = os.environ.get(STATUS_DIR_ENV), os.environ.get("RANK", "")
    if folder and rank.isdigit():
        try:
            (Path(folder) / f"rank-{rank}").write_text(str(code))
        except OSError:
            pass


def main() -> None:
    """Run `hat` with the command-line arguments and exit with its code."""
    code = run_cli()
    report_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
