"""Checks of the paths given on the command line, before anything reads or writes them: a
directory, a binary file or a foreign file gets one line naming it and what to give instead."""
from __future__ import annotations

import json
from pathlib import Path

from sweep.errors import UserError

STUDY_HINT = "give a study file (studies/NAME.toml), its journal file (studies/.runs/NAME.log) or a storage URL"


def _user_error(msg: str) -> Exception:
    return UserError(msg)


def read_text_file(path: str | Path, what: str, hint: str) -> str:
    """The UTF-8 text of `path`, or a UserError saying why it is not a `what` and `hint`."""
    p = Path(path)
    if p.is_dir():
        raise _user_error(f"{p} is a directory, not a {what}; {hint}")
    if not p.is_file():
        raise FileNotFoundError(f"no {what} at {p}; {hint}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _user_error(f"{p} is not a {what} (binary, not UTF-8 text); {hint}") from None


def check_study_target(target: str) -> None:
    """A STUDY argument that is a path must be a study file or an Optuna journal file."""
    if "://" in target or target.endswith(".toml"):
        return  # a storage URL, or a study file (sweep.space.load_spec checks it)
    p = Path(target)
    if p.is_dir():
        raise _user_error(f"{p} is a directory; {STUDY_HINT}")
    if not p.is_file():
        return  # sweep.pareto.open_storage says it is missing
    with p.open("rb") as f:
        first = f.readline(1 << 20)  # a journal's first line is its create-study record
        rest = f.read(1 << 20) if not first.strip() else b""
    if first.startswith(b"SQLite format 3\0"):
        raise _user_error(f"{p} is an SQLite database; give it as a storage URL: sqlite:///{p}")
    if not first.strip():
        if not rest.strip():
            return  # an empty journal: holds no study (open_study says so)
        raise _user_error(f"{p} is not an Optuna journal file; {STUDY_HINT}")  # a blank first line, then bytes
    try:
        ok = "op_code" in json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError):
        ok = False
    if not ok:
        raise _user_error(f"{p} is not an Optuna journal file; {STUDY_HINT}")


def check_output(path: str | Path | None, flag: str, kind: str = "file", default: str | None = None) -> None:
    """An output the user named on the command line (`kind` "file" or "dir"): its parent folder
    must exist. A command creates the output folder the user names, and folders inside it, but
    never a missing parent: `-o /nonexistent/dir/PERF.md` is a typo, not a request for
    /nonexistent/dir. An option left at its `default` is the tool's own layout and is created."""
    if path is None or (default is not None and str(path) == default):
        return
    p = Path(path)
    if kind == "file" and p.is_dir():
        raise _user_error(f"{flag} {path} is a directory; give a file name inside it")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise _user_error(f"{flag} {path} is a file; give a folder")
    parent = p.parent
    if not parent.is_dir():
        missing = parent
        while not missing.parent.is_dir() and missing.parent != missing:
            missing = missing.parent
        raise _user_error(f"{flag} {path}: no directory {missing}; create it first (mkdir -p {parent}) or fix the path")
