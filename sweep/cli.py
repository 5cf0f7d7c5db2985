"""The `sweep` command line: a thin dispatcher over the modules in `sweep.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each entry is a module under sweep.commands that defines register(subparsers).
COMMAND_MODULES = ("evaluate", "compare", "perf", "run", "worker", "status", "report", "pareto", "check", "sensitivity",
                   "allocate", "bench")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


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
    parser = build_parser()
    args = parser.parse_args(argv)
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
    # `python -m sweep.cli`: run the imported module's main, so that `from sweep.cli import
    # UserError` in the commands names the class this main catches (not a __main__ copy)
    from sweep.cli import main as _main

    sys.exit(_main())
