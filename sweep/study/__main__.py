"""`python -m sweep.study worker ...`: one worker process, started by `sweep run` (sweep.study.runner)."""
from __future__ import annotations

import argparse
import os
import sys

from sweep.study.runner import STORAGE_ENV
from sweep.study.worker import worker_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.study")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="one worker process (started by `sweep run`)")
    w.add_argument("--storage", default=os.environ.get(STORAGE_ENV),
                   help=f"storage URL (default: ${STORAGE_ENV}, how `sweep run` hands it over)")
    w.add_argument("--study", required=True)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    w.add_argument("--torch-device", default=None, help="torch device of the evaluation (default: the engine's)")
    args = ap.parse_args(argv)
    if not args.storage:
        ap.error(f"--storage or ${STORAGE_ENV} is required")
    return worker_main(args.storage, args.study, args.index, args.threads or None, args.torch_device)


if __name__ == "__main__":
    rc = main()
    # Every result is in the storage by now. Skip the interpreter's teardown: a C++ thread pool
    # (torch's, or the native kernel's) destroyed while joinable there aborts the process
    # ("terminate called without an active exception", exit -6), which `sweep run` would report
    # as a dead worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
