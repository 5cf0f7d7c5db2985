"""Small compiled kernels for the numerics, built on first use with the system C compiler.

`dest16()` returns the bf16-dest block kernel of `kernels/dest16.c` (ctypes), or None when no C
compiler is available or the build fails (then engine.numerics.fidelity uses its torch fallback, which
computes the same bits, only slower). The shared object is cached under
`<cache>/native/<hash>/`, keyed by the source, the flags and this machine's CPU, so a cache shared
between different CPUs never loads a binary built with another's `-march=native`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

_SRC = Path(__file__).with_name("kernels") / "dest16.c"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-fast-math", "-shared", "-fPIC"]


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _cache_root() -> Path:
    root = os.environ.get("TTSWEEP_CACHE") or Path.home() / ".cache" / "ttsweep"
    return Path(root).expanduser() / "native"


def _build(src: Path, target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: build, then rename
        out = Path(tmp) / target.name
        subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, text=True)
        os.replace(out, target)


def dest16():
    """The compiled `dest16_block` function, or None (torch fallback) with one warning."""
    lib = _lib()
    return None if lib is None else lib.dest16_block


def set_ties_away(away: bool) -> None:
    """The compiled kernel's bf16 narrowing: ties away from zero (True) or to even (False)."""
    lib = _lib()
    if lib is not None:
        lib.dest16_set_ties_away(ctypes.c_int64(1 if away else 0))


@lru_cache(maxsize=None)
def _lib():
    """The compiled kernel library (argument types set), or None (torch fallback) with one warning."""
    if os.environ.get("TTSWEEP_NO_NATIVE"):
        return None
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = _cache_root() / key / "dest16.so"
    try:
        if not target.exists():
            _build(_SRC, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(f"bf16-dest kernel not built ({str(detail).strip()[:200]}); using the slower torch path", stacklevel=2)
        return None
    fn = lib.dest16_block
    p, i = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, i, i, i, i, i, i, i, i, i]
    fn.restype = None
    lib.dest16_set_ties_away.argtypes = [i]
    lib.dest16_set_ties_away.restype = None
    return lib
