"""The `sweep` command line: a thin dispatcher over the modules in `sweep.commands`."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from sweep.errors import UserError

# Each entry is a module under sweep.commands that defines register(subparsers).
COMMAND_MODULES = ("evaluate", "compare", "perf", "run", "worker", "status", "report", "pareto", "check", "sensitivity",
                   "allocate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"sweep.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet
            if exc.name == f"sweep.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Called as the `sweep` program (`argv` None), a command
    that sets `hard_exit` (`sweep worker`) ends the process here without interpreter teardown,
    once its output is flushed: everything it did is stored by then, and the teardown of torch's
    or the native kernel's thread pools can abort a process ("terminate called without an active
    exception", exit 134) after it reported success."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = _run(args)
    if argv is None and getattr(args, "hard_exit", False):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"sweep {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"sweep {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
