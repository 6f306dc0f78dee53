"""Plain-text data in bounded memory: a file is tokenized in pieces of about
`PIECE_CHARS` characters (cut after a newline, else a space) into one compact array (uint16
when the vocabulary fits, else int32), and training blocks are `TokenSpan` views of it.

Memory for a file of T tokens: about 2 bytes x T twice while the pieces are joined (4 bytes
x T with a vocabulary over 65,535), one batch of pieces (1 Mi characters) with the
tokenizer's encodings, and about 100 bytes per block: a 300 MB file stays well under 2 GB. Special tokens (BOS) are added once,
at the start; a tokenizer that marks the start of a text (SentencePiece's dummy prefix)
may tokenize the first word of each piece differently from a whole-file call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PIECE_CHARS = 1 << 16
BATCH_PIECES = 16  # pieces per call of a fast tokenizer (encoded in parallel)


class TokenSpan(Sequence):
    """A read-only run of token ids: `ids[start:stop]` of a shared array, equal to the
    tuple (or list) of the same ints; `np.asarray(span)` gives them as int64."""

    __slots__ = ("_ids", "_start", "_stop")

    def __init__(self, ids: np.ndarray, start: int = 0, stop: int | None = None) -> None:
        self._ids, self._start = ids, start
        self._stop = len(ids) if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return TokenSpan(self._ids, self._start + start, self._start + max(start, stop))
            return tuple(self.tolist()[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("TokenSpan index out of range")
        return int(self._ids[self._start + index])

    def __iter__(self) -> Iterator[int]:
        return iter(self.tolist())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._ids[self._start : self._stop].astype(dtype or np.int64)

    def tolist(self) -> list[int]:
        return self._ids[self._start : self._stop].tolist()

    def max(self) -> int:
        return int(self._ids[self._start : self._stop].max()) if len(self) else -1

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (TokenSpan, tuple, list)):
            return self.tolist() == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.tolist()))

    def __repr__(self) -> str:
        return f"TokenSpan({self.tolist()!r})"


def _pieces(path: Path) -> Iterator[str]:
    """The file's text in pieces of about PIECE_CHARS characters, each ending after a
    newline (else a space) where the text has one; UnicodeDecodeError for non-UTF-8."""
    carry = ""
    with open(path, encoding="utf-8") as f:
        while True:
            block = f.read(PIECE_CHARS)
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n")
            cut = text.rfind(" ") if cut < 0 else cut
            if cut < 0 or cut + 1 == len(text):
                carry, piece = "", text
            else:
                carry, piece = text[cut + 1 :], text[: cut + 1]
            yield piece
    if carry:
        yield carry


def _encoded(tokenizer: Any, pieces: list[str], first: bool) -> list[list[int]]:
    """Token ids of each piece (special tokens on the first piece of the file only); a
    fast tokenizer encodes the batch in parallel in its Rust backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [tokenizer(p, add_special_tokens=first and k == 0)["input_ids"]
                for k, p in enumerate(pieces)]  # fmt: skip
    head = [backend.encode(pieces[0], add_special_tokens=True).ids] if first else []
    rest = backend.encode_batch(pieces[len(head) :], add_special_tokens=False)
    return head + [e.ids for e in rest]


def encode_text_file(tokenizer: Any, path: str | os.PathLike) -> np.ndarray | None:
    """Token ids of a UTF-8 text file (special tokens once, at the start) as one compact
    1-D array; None when the file holds only whitespace."""
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 1 << 31
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.int32
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in _encoded(tokenizer, batch, first=not parts):
            parts.append(np.asarray(ids, dtype=dtype))
        batch.clear()

    for piece in _pieces(Path(path)):
        if piece.strip():
            batch.append(piece)
            if len(batch) == BATCH_PIECES:
                flush()
    if batch:
        flush()
    return np.concatenate(parts) if parts else None
