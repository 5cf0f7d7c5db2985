"""Progress bars of long operations (tqdm): what is done, the rate and the time left.

A bar is drawn on stderr only when stderr is a terminal: a log file, a pipe or a test's captured
output gets nothing. `TTSWEEP_PROGRESS=0` turns bars off, `TTSWEEP_PROGRESS=1` draws them even
when stderr is not a terminal. Bars of one step give no estimate and are not drawn.
"""
from __future__ import annotations

import os
import sys


def enabled() -> bool:
    """Whether bars are drawn: `TTSWEEP_PROGRESS` (0 / 1) if set, else whether stderr is a terminal."""
    env = os.environ.get("TTSWEEP_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
        leave: bool = False, show: bool = True, **kwargs):
    """A tqdm bar on stderr (disabled as `enabled()` says, when `show` is false, or for a single
    step): iterate over it, or call `.update(n)`; `.close()` when done (or use it in a `with`)."""
    from tqdm import tqdm

    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    disable = not (show and enabled()) or (n is not None and n <= 1)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, disable=disable,
                dynamic_ncols=True, smoothing=0.1, **kwargs)


def write(line: str, file=None) -> None:
    """Print a line without breaking a bar being drawn (tqdm.write; plain print otherwise)."""
    from tqdm import tqdm

    tqdm.write(line, file=file or sys.stdout)
