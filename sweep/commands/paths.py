"""Checks of the paths given on the command line, before anything reads or writes them: a
directory, a binary file or a foreign file gets one line naming it and what to give instead."""
from __future__ import annotations

import json
from pathlib import Path

STUDY_HINT = "give a study file (studies/NAME.toml), its journal file (studies/.runs/NAME.log) or a storage URL"


def _user_error(msg: str) -> Exception:
    from sweep.cli import UserError

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
    if first.startswith(b"SQLite format 3\0"):
        raise _user_error(f"{p} is an SQLite database; give it as a storage URL: sqlite:///{p}")
    if not first.strip():
        return  # an empty journal: holds no study (open_study says so)
    try:
        ok = "op_code" in json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError):
        ok = False
    if not ok:
        raise _user_error(f"{p} is not an Optuna journal file; {STUDY_HINT}")
