"""Checks shared by the study-file readers (sweep.space.parse, sweep.space.grid): each failure is
a `StudyFileError` naming the file and the key."""
from __future__ import annotations

from typing import Any, Sequence

from sweep.space.model import StudyFileError


def fail(where: str, msg: str) -> StudyFileError:
    return StudyFileError(f"{where}: {msg}")


def check_keys(where: str, table: str, d: Any, legal: Sequence[str]) -> dict:
    if not isinstance(d, dict):
        raise fail(where, f"[{table}] must be a table of keys ({', '.join(legal)}), not {type(d).__name__}")
    for k in d:
        if k not in legal:
            full = f"{table}.{k}" if table else str(k)
            raise fail(where, f"unknown key {full!r}; legal keys in [{table or 'top level'}]: {', '.join(legal)}")
    return d


def as_int(where: str, key: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(where, f"{key} must be an integer, not {v!r}")
    if v < lo:
        raise fail(where, f"{key} must be >= {lo}, not {v}")
    return v


def str_list(where: str, key: str, v: Any, allow_str: bool = True) -> list[str]:
    if isinstance(v, str) and allow_str:
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise fail(where, f"{key} must be a list of strings, not {v!r}")
    return list(v)
