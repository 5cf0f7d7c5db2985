"""Disk cache of quantized weights: a study quantizes each (tensor, format) of a checkpoint once,
not once per trial, when its weights are streamed from disk layer by layer.

Entries are safetensors files (one tensor, bf16: every bf16 / bfp8 / bfp4 value is exactly a bf16
value) under `<cache>/weights/<checkpoint fingerprint>-<code digest>/<format>/<name>.safetensors`.
The code digest hashes the modules that decide a quantized weight's bits (engine.numerics.formats,
engine.numerics.native, engine.models.model), so a change to the numerics never reads a stale entry. Writes are
atomic (temporary file + rename); the cache's total size is bounded by TTSWEEP_WEIGHT_CACHE_GB
(default 16; 0 turns the cache off), least recently used entries evicted first.
"""
from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_LIMIT_GB = 16.0
_CODE = ("numerics/formats.py", "numerics/native.py", "models/model.py")  # under engine/


@lru_cache(maxsize=1)
def code_digest() -> str:
    """12 hex digits over the sources that decide a quantized weight's bits."""
    h = hashlib.sha256()
    for name in _CODE:
        h.update((Path(__file__).resolve().parents[1] / name).read_bytes())
    return h.hexdigest()[:12]


def limit_bytes() -> int:
    """The cache's size bound from TTSWEEP_WEIGHT_CACHE_GB (ValueError, naming it, if malformed)."""
    raw = os.environ.get("TTSWEEP_WEIGHT_CACHE_GB", "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_LIMIT_GB
    except ValueError:
        raise ValueError(f"TTSWEEP_WEIGHT_CACHE_GB={raw!r} is not a number of gigabytes (e.g. 16; 0 turns the cache off)") from None
    if not gb >= 0:
        raise ValueError(f"TTSWEEP_WEIGHT_CACHE_GB={raw!r} must be >= 0 (0 turns the cache off)")
    return int(gb * 2**30)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.safetensors") if p.is_file()] if root.is_dir() else []


class WeightCache:
    """get(name, fmt) -> bf16 tensor or None; put(name, fmt, tensor). One checkpoint's entries; the
    size bound covers every checkpoint's entries under `<cache>/weights`."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, limit: int | None = None):
        self.root = Path(cache_dir) / "weights"
        self.dir = self.root / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', fingerprint)}-{code_digest()}"
        self.limit = limit_bytes() if limit is None else int(limit)
        self._size: int | None = None
        self.hits = self.misses = 0

    def _path(self, name: str, fmt: str) -> Path:
        return self.dir / fmt / (re.sub(r"[^A-Za-z0-9_.\[\]:-]", "_", name).replace(":", "-") + ".safetensors")

    @property
    def size(self) -> int:
        """Bytes held under `<cache>/weights` (every checkpoint)."""
        if self._size is None:
            self._size = sum(p.stat().st_size for p in _files(self.root))
        return self._size

    def get(self, name: str, fmt: str) -> torch.Tensor | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self._path(name, fmt)
        if self.limit <= 0 or not p.is_file():
            self.misses += 1
            return None
        try:
            t = load_file(str(p))["w"]
            os.utime(p)  # least recently used goes first
        except (SafetensorError, OSError, KeyError, RuntimeError):
            p.unlink(missing_ok=True)  # a torn or foreign file: quantize again
            self._size = None
            self.misses += 1
            return None
        self.hits += 1
        return t

    def put(self, name: str, fmt: str, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if self.limit <= 0 or t.dtype != torch.bfloat16:
            return
        nbytes = t.numel() * 2
        if nbytes > self.limit:
            return
        p = self._path(name, fmt)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            save_file({"w": t.detach().cpu().contiguous()}, str(tmp))
            os.replace(tmp, p)
        except OSError:  # a full disk must not fail a trial: the weight is in memory already
            tmp.unlink(missing_ok=True)
            return
        self._size = self.size + p.stat().st_size
        if self._size > self.limit:
            self.evict()

    def evict(self) -> None:
        """Delete least recently used entries until the cache fits its bound."""
        files = sorted(_files(self.root), key=lambda q: q.stat().st_mtime)
        total = sum(q.stat().st_size for q in files)
        for q in files:
            if total <= self.limit:
                break
            total -= q.stat().st_size
            q.unlink(missing_ok=True)
        self._size = total

    def describe(self) -> str:
        return (f"weight cache {self.size / 2**30:.2f} GB of {self.limit / 2**30:.0f} GB at {self.root} "
                f"({self.hits} read, {self.misses} quantized)")
