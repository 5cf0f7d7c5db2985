"""The per-token record of one accuracy trial: what happened at every scored position.

Per scored position (all windows, window after window, `decode` positions each):

  top1   bool     the trial argmax equals the reference argmax (llama.cpp's "same top")
  top5   bool     the trial argmax is inside the reference top-5
  kld    float16  KL(reference || trial) in nats over the full vocabulary
  p_top  float16  the probability the trial gives the reference's argmax token
  dp     float16  trial minus reference probability of the true next token (llama.cpp's delta-p)

Paired tests (`engine.accuracy.stats.compare`) need these per position: two configs scored on the same
tokens disagree on only a few of them. `eval_key` names what the positions are (model weights,
text, prefill, decode), so records of different evaluations are never paired.

Precision: float16 keeps 11 significant bits (relative error <= 2^-11 ~ 5e-4 per value), far
below the token-to-token spread the paired statistics work with; the trial's own summary
statistics (`EvalResult.stats`, the trial's `kld_stats`) are computed in float64 before rounding,
so `engine.accuracy.stats.kld_stats` of a decoded record can differ from them in the 4th digit.

Serialised form (`to_bytes` / `to_base64`): safetensors (never pickle) with four tensors:
`bits` uint8 [2, ceil(N/8)] (top1, top5 bit-packed), `values` float16 [3, N] (kld, p_top, dp),
`meta` int64 [format, N, windows] and `eval_key` (its UTF-8 bytes). 511 positions take ~3.5 KB
(base64 ~4.6 KB), small enough for an Optuna trial user attribute, so a study on any storage
(journal, PostgreSQL) carries its records to every host.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Sequence

import numpy as np

FORMAT = 1  # bump when the serialised layout changes
_ARRAYS = {"kld": np.float16, "p_top": np.float16, "dp": np.float16}
_BITS = ("top1", "top5")


class RecordError(ValueError):
    """A serialised record that cannot be read (corrupt, foreign, or of another format)."""


@dataclass
class TokenRecord:
    top1: np.ndarray  # bool [N]
    top5: np.ndarray  # bool [N]
    kld: np.ndarray  # float16 [N]
    p_top: np.ndarray  # float16 [N]
    dp: np.ndarray  # float16 [N]
    windows: int = 1  # N = windows * positions per window
    eval_key: str = ""  # what the positions are: model fingerprint, text, prefill, decode

    def __post_init__(self):
        self.top1 = np.asarray(self.top1, dtype=bool).reshape(-1)
        self.top5 = np.asarray(self.top5, dtype=bool).reshape(-1)
        for name, dtype in _ARRAYS.items():
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype).reshape(-1))
        n = self.top1.size
        sizes = {k: getattr(self, k).size for k in (*_BITS, *_ARRAYS)}
        if set(sizes.values()) != {n}:
            raise ValueError(f"per-token arrays differ in length: {sizes}")
        self.windows = int(self.windows)
        if self.windows < 1 or n % self.windows:
            raise ValueError(f"{n} positions cannot be split into {self.windows} equal windows")

    def __len__(self) -> int:
        return int(self.top1.size)

    @property
    def per_window(self) -> int:
        return len(self) // self.windows

    def window_lengths(self) -> list[int]:
        return [self.per_window] * self.windows

    def window(self, w: int) -> "TokenRecord":
        """The record of window `w` alone (window 0 = tt-metal's single-window method)."""
        if not 0 <= w < self.windows:
            raise IndexError(f"window {w} outside 0..{self.windows - 1}")
        s = slice(w * self.per_window, (w + 1) * self.per_window)
        return TokenRecord(self.top1[s], self.top5[s], self.kld[s], self.p_top[s], self.dp[s], 1, self.eval_key)

    def top1_by_window(self) -> list[float]:
        """Top-1 (%) of each window."""
        return [100.0 * float(x) for x in self.top1.reshape(self.windows, -1).mean(axis=1)]

    @classmethod
    def concat(cls, parts: Sequence["TokenRecord"]) -> "TokenRecord":
        """Windows one after the other (all parts: one window each, of one length and eval_key)."""
        if not parts or len({len(p) for p in parts}) != 1 or len({p.eval_key for p in parts}) != 1:
            raise ValueError("concat needs one or more windows of one length and one eval_key")
        cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in (*_BITS, *_ARRAYS)}
        return cls(**cat, windows=sum(p.windows for p in parts), eval_key=parts[0].eval_key)

    # --- serialisation ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save({
            "bits": np.stack([np.packbits(getattr(self, k)) for k in _BITS]),
            "values": np.stack([getattr(self, k) for k in _ARRAYS]),
            "meta": np.array([FORMAT, len(self), self.windows], dtype=np.int64),
            "eval_key": np.frombuffer(self.eval_key.encode("utf-8"), dtype=np.uint8),
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> "TokenRecord":
        from safetensors.numpy import load

        try:
            t = load(bytes(data))
            fmt, n, windows = (int(x) for x in t["meta"])
            if fmt != FORMAT:
                raise RecordError(f"per-token record of format {fmt}; this version reads format {FORMAT}")
            bits = {k: np.unpackbits(t["bits"][i], count=n).astype(bool) for i, k in enumerate(_BITS)}
            values = {k: t["values"][i] for i, k in enumerate(_ARRAYS)}
            return cls(**bits, **values, windows=windows, eval_key=t["eval_key"].tobytes().decode("utf-8"))
        except RecordError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on corrupt input
            raise RecordError(f"not a per-token record ({type(exc).__name__}: {exc})") from exc

    def to_base64(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_base64(cls, text: str) -> "TokenRecord":
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
            raise RecordError(f"per-token record is not base64 text ({exc})") from exc
        return cls.from_bytes(raw)

    def equals(self, other: "TokenRecord") -> bool:
        """Same positions, same values (bit for bit at the stored precision)."""
        return (self.windows == other.windows and self.eval_key == other.eval_key
                and all(np.array_equal(getattr(self, k), getattr(other, k)) for k in (*_BITS, *_ARRAYS)))
