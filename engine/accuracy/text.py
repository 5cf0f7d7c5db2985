"""The evaluation text: A Tale of Two Cities (Project Gutenberg ebook 98), bundled as
`engine/data/tale-of-two-cities.txt.bz2`.

`load_text()` returns the book as the accuracy method reads it:

- the UTF-8 byte-order mark is stripped and CRLF line ends become LF;
- the text is cut just before the `*** END OF THE PROJECT GUTENBERG EBOOK` line, so the Project
  Gutenberg licence that follows it never reaches the model;
- the START of the file is kept exactly as distributed. tt-metal tokenizes the file from its
  first byte, so whatever header the distributed file has is kept (this copy has no
  `*** START OF` licence block: it opens with the title page and the table of contents, which
  are therefore part of the first 1024 tokens, as on the hardware).

`text_tokens(tokenizer, n)` gives the first `n` tokens of that text under a tokenizer, with the
tokenizer's special tokens left out (`add_special_tokens=False`: no BOS), as tt_transformers'
accuracy test encodes the text for Hugging Face checkpoints (`ModelArgs.encode_prompt(..., instruct=False)`
-> `tokenizer.encode(text, add_special_tokens=False)`; only Meta-format checkpoints get a BOS).
"""
from __future__ import annotations

import bz2
import functools
import hashlib
from pathlib import Path

TEXT_PATH = Path(__file__).resolve().parents[1] / "data" / "tale-of-two-cities.txt.bz2"
END_MARKER = "*** END OF THE PROJECT GUTENBERG EBOOK"


@functools.lru_cache(maxsize=1)
def load_text() -> str:
    """The evaluation text (BOM stripped, LF line ends, cut before the Gutenberg END line)."""
    if not TEXT_PATH.exists():
        raise FileNotFoundError(f"evaluation text {TEXT_PATH} is missing; reinstall the package (pip install -e .)")
    text = bz2.decompress(TEXT_PATH.read_bytes()).decode("utf-8")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    cut = text.find(END_MARKER)
    if cut < 0:
        raise ValueError(f"{TEXT_PATH}: no {END_MARKER!r} line; not the expected Gutenberg file")
    return text[:cut].rstrip("\n") + "\n"


@functools.lru_cache(maxsize=1)
def text_sha256() -> str:
    """SHA-256 of the evaluation text (after normalisation): part of every reference cache key."""
    return hashlib.sha256(load_text().encode("utf-8")).hexdigest()


def _encode(tokenizer, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # minimal tokenizers without the keyword
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def text_tokens(tokenizer, n: int) -> list[int]:
    """The first `n` tokens of the evaluation text.

    Only a prefix of the book is tokenized (fast); the prefix is grown until it yields at least
    64 tokens more than needed, so the cut cannot change the first `n` tokens (a BPE token never
    spans more than one pre-tokenized word, and any trailing special token is dropped).
    """
    if n < 1:
        raise ValueError(f"need a positive token count, got {n}")
    text = load_text()
    chars = max(4096, 8 * n)
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= n + 64 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n:
        raise ValueError(f"the evaluation text has only {len(ids)} tokens under this tokenizer; {n} requested")
    return ids[:n]
