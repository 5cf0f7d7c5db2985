"""Weight stores: a checkpoint's tensors read one at a time, so no model has to be whole in memory.

A store is a read-only `Mapping[str, torch.Tensor]`: `store[name]` reads that tensor afresh (fp32,
contiguous) and nothing is kept, so peak memory follows what the caller holds, not the checkpoint.
Beyond the mapping, `rows(name, ids)` reads chosen rows of a matrix (the embedding lookup) and
`row_block(name, start, stop)` a range of rows (an LM head vocabulary chunk, a slice of a fused
tensor), each without reading the rest.

    DictStore(tensors)              tensors already in memory (GGUF models, tests)
    SafetensorsStore(dir)           a Hugging Face directory's safetensors, single-file or sharded
                                    (model.safetensors.index.json), names as stored; bf16 / fp16 /
                                    fp32 tensors widened to fp32 on read
    CanonicalStore(raw, spec)       the engine's canonical names over a raw store (splits Phi-3's
                                    fused qkv_proj / gate_up_proj by row ranges)

`SafetensorsStore` reads with the `safetensors` library, opening the file for each read and closing
it after, so the pages of a memory-mapped file do not stay resident between reads.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from engine.models.spec import ModelFormatError, ModelSpec  # noqa: F401 (ModelFormatError: this module's API)

#: Stored dtypes a checkpoint may hold (safetensors names) and their width in bytes.
STORED_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


CHUNK_BYTES = 256 << 20  # fp32 bytes of one vocabulary chunk of an embedding-sized matrix


def vocab_chunks(vocab: int, hidden: int, chunk_bytes: int = CHUNK_BYTES, rows: int = 32) -> list[tuple[int, int]]:
    """Row ranges of a [vocab, hidden] matrix read and applied a chunk at a time: multiples of
    `rows` rows (no bfp block or tile straddles two chunks), each at most `chunk_bytes` of fp32."""
    step = max(rows, chunk_bytes // (4 * hidden) // rows * rows)
    return [(a, min(vocab, a + step)) for a in range(0, vocab, step)]


def give_back_memory() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere). Layer-streamed
    runs free one layer's tensors before reading the next; without this, glibc's heap keeps the
    holes and resident memory grows with the number of layers (measured: ~4 MB per layer)."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (Linux; a fresh process starts at zero), else
    getrusage's ru_maxrss, which Linux carries over from the parent across fork + exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class WeightStore(Mapping):
    """Read-only name -> fp32 tensor mapping, each access a fresh read (see the module docstring).
    `_names` is each store's own index (name -> where the tensor is read from)."""

    _names: Mapping

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self[name][start:stop].contiguous()

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any order, repeats allowed) of a 2-D tensor, reading each distinct row once."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        uniq, inv = torch.unique(ids, return_inverse=True)
        parts, run = [], []
        for i in uniq.tolist():  # contiguous runs of distinct ids: one read each
            if run and i != run[-1] + 1:
                parts.append(self.row_block(name, run[0], run[-1] + 1))
                run = []
            run.append(i)
        if run:
            parts.append(self.row_block(name, run[0], run[-1] + 1))
        return torch.cat(parts)[inv] if parts else torch.empty(0, self.shape(name)[1])

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor in fp32 (the engine's working precision)."""
        n = 4
        for d in self.shape(name):
            n *= d
        return n


class DictStore(WeightStore):
    """Tensors already in memory (fp32 on read; the dict's tensors are returned, not copied)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._t = self._names = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._t[name]
        return t if t.dtype == torch.float32 else t.to(torch.float32)


    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self[name][start:stop]

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self[name][torch.as_tensor(ids, dtype=torch.long).cpu()]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:  # tests poke weights in place
        self._t[name] = value


def _read_header(path: Path) -> dict:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}), checked against its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelFormatError(f"{path}: not a safetensors file (shorter than its header); re-save the checkpoint")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                raise ModelFormatError(f"{path}: corrupt safetensors header (length {n}); re-save or re-download the shard")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read safetensors file ({exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFormatError(f"{path}: corrupt safetensors header (not JSON); re-save or re-download the shard") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if size < 8 + n + end:
        raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes, its tensors need {8 + n + end}); re-download the shard")
    return header


class SafetensorsStore(WeightStore):
    """A Hugging Face directory's safetensors files under their stored names (headers read once)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.files = safetensors_files(self.dir)
        self._where: dict[str, Path] = {}
        self._names = self._where
        self._info: dict[str, dict] = {}
        index = _index_map(self.dir)
        for f in self.files:
            for name, info in _read_header(f).items():
                if info.get("dtype") not in STORED_DTYPES:
                    raise ModelFormatError(f"{f}: tensor {name} is stored as {info.get('dtype')}; only "
                                     f"{', '.join(STORED_DTYPES)} are read (re-save the checkpoint in bf16)")
                if index is not None and index.get(name, f.name) != f.name:
                    raise ModelFormatError(f"{f}: holds {name}, which model.safetensors.index.json places in {index[name]}")
                self._where[name] = f
                self._info[name] = info
        if index is not None:
            lost = sorted(set(index) - set(self._where))
            if lost:
                raise ModelFormatError(f"{self.dir}: model.safetensors.index.json lists {len(lost)} tensors no shard holds "
                                 f"(e.g. {lost[0]} in {index[lost[0]]}); re-download that shard")


    def dtype(self, name: str) -> str:
        return self._info[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._info[name]["shape"])

    def _read(self, name: str, sl: slice | None) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        if name not in self._where:
            raise KeyError(name)
        f = self._where[name]
        try:
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name) if sl is None else h.get_slice(name)[sl]
                return t.to(torch.float32).contiguous()  # a copy: the mapping closes with the file
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelFormatError(f"{f}: cannot read tensor {name} ({exc}); re-download the shard") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, slice(start, stop))


class CanonicalStore(WeightStore):
    """The engine's canonical names (engine.models.loaders) over a raw store of a Hugging Face checkpoint:
    Phi-3's fused qkv_proj and gate_up_proj are read as row ranges, rotary inv_freq buffers and a
    tied checkpoint's lm_head are left out."""

    def __init__(self, raw: WeightStore, spec: ModelSpec):
        self.raw, self.spec = raw, spec
        self._map: dict[str, tuple[str, int, int | None]] = {}  # canonical -> (raw name, row start, row stop)
        self._names = self._map
        q, kv, inter = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.intermediate
        for name in raw:
            if name.endswith("rotary_emb.inv_freq") or (spec.tied_embeddings and name == "lm_head.weight"):
                continue
            fused = {"self_attn.qkv_proj.weight": q + 2 * kv, "mlp.gate_up_proj.weight": 2 * inter}
            rows = next((r for suffix, r in fused.items() if spec.arch == "phi3" and name.endswith(suffix)), None)
            if rows is not None and raw.shape(name)[0] != rows:
                raise ModelFormatError(f"{name} has {raw.shape(name)[0]} rows, expected {rows}; the weights do not match config.json")
            if spec.arch == "phi3" and name.endswith("self_attn.qkv_proj.weight"):
                pre = name.removesuffix("qkv_proj.weight")
                for part, a, b in (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)):
                    self._map[f"{pre}{part}_proj.weight"] = (name, a, b)
            elif spec.arch == "phi3" and name.endswith("mlp.gate_up_proj.weight"):
                pre = name.removesuffix("gate_up_proj.weight")
                self._map[pre + "gate_proj.weight"] = (name, 0, inter)
                self._map[pre + "up_proj.weight"] = (name, inter, 2 * inter)
            else:
                self._map[name] = (name, 0, None)


    def shape(self, name: str) -> tuple[int, ...]:
        src, a, b = self._map[name]
        full = self.raw.shape(src)
        return full if b is None else (b - a, *full[1:])

    def __getitem__(self, name: str) -> torch.Tensor:
        src, a, b = self._map[name]
        return self.raw[src] if b is None else self.raw.row_block(src, a, b)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        src, a, b = self._map[name]
        stop = min(stop, self.shape(name)[0])
        return self.raw.row_block(src, a + start, a + stop)


# --- the files of a Hugging Face directory -------------------------------------------------------
def _index_map(path: Path) -> dict[str, str] | None:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        wmap = json.loads(index.read_text())["weight_map"]
        if not isinstance(wmap, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{index}: not a valid safetensors index ({exc}); re-download it") from None
    return {str(k): str(v) for k, v in wmap.items()}


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards its index names (each must exist), else every
    *.safetensors file. Pickled weights alone are refused (never unpickled)."""
    wmap = _index_map(path)
    if wmap is not None:
        files = [path / f for f in sorted(set(wmap.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in model.safetensors.index.json are missing: "
                                    f"{', '.join(missing)}; download them next to config.json")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelFormatError(
                f"{path}: only pickled weights ({', '.join(pickled)}); pickles are never loaded (unsafe): convert the "
                "checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True) on a trusted machine)"
            )
        raise FileNotFoundError(f"{path}: no *.safetensors weight files; put the checkpoint's model.safetensors "
                                "(or its shards + model.safetensors.index.json) next to config.json")
    return files
