"""One "host" of the multi-host tests: `sweep worker` on a series of studies, each started at the
same moment as on the other hosts (a file barrier), in one process.

    TTSWEEP_HOST=hostA python tests/pg_host.py BARRIER_DIR N_HOSTS STUDY_FILE...

Prints one line per study: `race I rc RC`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> int:
    barrier, n_hosts, studies = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    from sweep.cli import main as cli

    host = os.environ.get("TTSWEEP_HOST", "?")
    worst = 0
    for i, study in enumerate(studies):
        (barrier / f"{i}.{host}").touch()
        while len(list(barrier.glob(f"{i}.*"))) < n_hosts:
            time.sleep(0.005)
        rc = cli(["worker", study, "--threads", "1"])
        print(f"race {i} rc {rc}", flush=True)
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main())
