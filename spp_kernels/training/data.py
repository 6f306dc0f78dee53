"""Training and evaluation data for the `spp` command: Alpaca JSON/JSONL, plain text, token ids.

Accepted files (chosen by extension):
- ``.json``: a list of records, ``.jsonl``: one record per line. A record is either an
  Alpaca example ``{"instruction", "input" (optional), "output"}``, a ``{"text": ...}``
  document, or pre-tokenized ``{"input_ids": [int, ...]}`` (no tokenizer needed).
- ``.txt`` / anything else: UTF-8 plain text, tokenized in bounded pieces and cut into
  ``max_len`` blocks (`tokens`: memory stays proportional to the token count).

Alpaca examples use the standard Alpaca prompt template. By default the loss covers the
prompt and the response (the SPP authors' setup); ``mask_prompt=True`` sets the prompt's
labels to -100 so only the response is learned.

A dataset is a list of `Example`s (token ids and labels, each at most ``max_len`` long).
`batch_order` gives the seeded order of examples in an epoch and `collate` pads a batch,
so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.io import file_sha256, parse_json
from ..utils.seeding import derive_seed
from .tokens import TokenSpan, encode_text_file

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """A data file cannot be used; the message names the file (and line) and the problem."""


@dataclass(frozen=True)
class Example:
    """One training sequence: `input_ids` and `labels` (same length, -100 = no loss):
    tuples, or `TokenSpan` views of a text file's token array."""

    input_ids: Sequence[int]
    labels: Sequence[int]


def alpaca_prompt(record: dict[str, Any]) -> str:
    """The Alpaca prompt for a record (the template with or without the input section)."""
    instruction = str(record.get("instruction", ""))
    context = str(record.get("input", "") or "")
    if context.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: identifies the data a checkpoint was trained on."""
    return file_sha256(path)


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "input_ids" in record:
        ids = record["input_ids"]
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise DataError(f"{where}: 'input_ids' must be a non-empty list of token ids >= 0")
        return record
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return record
    if "instruction" in record and "output" in record:
        for key in ("instruction", "output"):
            if not isinstance(record[key], str):
                raise DataError(f"{where}: '{key}' must be a string")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(f"{where}: 'input' must be a string")
        return record
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"{where}: record needs 'instruction' and 'output' (Alpaca), 'text' or 'input_ids'; "
        f"it has keys: {keys}"
    )


def read_records(path: str | os.PathLike) -> list[dict[str, Any]] | str:
    """Parse a data file: a list of checked records for .json/.jsonl, else the text itself.

    Raises `DataError` naming the file (and the line for JSONL) for a missing file,
    unparseable JSON, a record of the wrong shape or an empty dataset.
    """
    p = _data_file(Path(path))
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            records.append(_check_record(obj, f"{p}:{lineno}"))
    elif suffix == ".json":
        obj = parse_json(raw, str(p), list, DataError)
        records = [_check_record(r, f"{p}: record {i}") for i, r in enumerate(obj)]
    else:
        if not raw.strip():
            raise DataError(f"{p}: empty dataset (no text)")
        return raw
    if not records:
        raise DataError(f"{p}: empty dataset (no records)")
    return records


def _require_tokenizer(tokenizer: Any, path: Path) -> None:
    if tokenizer is None:
        raise DataError(
            f"{path}: text data needs a tokenizer, but the model directory has none "
            "(save one next to the model, or give pre-tokenized 'input_ids' records)"
        )


def _data_file(path: Path) -> Path:
    """`path`, or DataError when it is missing or a directory."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    return path


def _is_text_file(path: Path) -> bool:
    """A plain-text data file (anything but .json / .jsonl) that exists."""
    return _data_file(path).suffix.lower() not in (".json", ".jsonl")


def _encode_file(tokenizer: Any, path: Path) -> Any:
    """A text file's token ids in bounded memory (`tokens.encode_text_file`)."""
    try:
        ids = encode_text_file(tokenizer, path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if ids is None:
        raise DataError(f"{path}: empty dataset (no text)")
    return ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _blocks(ids: list[int], max_len: int) -> list[Example]:
    out = []
    for start in range(0, len(ids), max_len):
        chunk = tuple(ids[start : start + max_len])
        if len(chunk) >= 2:  # a single token has no next-token target
            out.append(Example(chunk, chunk))
    return out


def _example(ids: list[int], n_prompt: int, max_len: int, mask_prompt: bool) -> Example | None:
    ids = ids[:max_len]
    labels = list(ids)
    if mask_prompt:
        labels[: min(n_prompt, len(ids))] = [IGNORE_INDEX] * min(n_prompt, len(ids))
    if len(ids) < 2 or all(t == IGNORE_INDEX for t in labels[1:]):
        return None
    return Example(tuple(ids), tuple(labels))


def load_dataset(
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    max_len: int = 512,
    mask_prompt: bool = False,
) -> list[Example]:
    """Read and tokenize a data file into training examples of at most `max_len` tokens.

    Alpaca records become prompt + output + EOS (truncated to `max_len`); text records and
    plain-text files are tokenized and cut into `max_len` blocks; `input_ids` records are
    used as they are (truncated). Raises `DataError` if nothing usable remains.
    """
    if max_len < 2:
        raise DataError(f"max_len must be >= 2, got {max_len}")
    p = Path(path)
    if _is_text_file(p):
        _require_tokenizer(tokenizer, p)
        ids = _encode_file(tokenizer, p)
        examples = [
            Example(span, span)
            for start in range(0, len(ids), max_len)
            if len(span := TokenSpan(ids, start, min(start + max_len, len(ids)))) >= 2
        ]
    else:
        content = read_records(p)
        examples = []
        eos = getattr(tokenizer, "eos_token_id", None)
        for record in content:
            if "input_ids" in record:
                ex = _example(list(record["input_ids"]), 0, max_len, False)
                examples += [ex] if ex else []
                continue
            _require_tokenizer(tokenizer, p)
            if "text" in record:
                examples += _blocks(_encode(tokenizer, record["text"]), max_len)
                continue
            prompt = alpaca_prompt(record)
            prompt_ids = _encode(tokenizer, prompt)
            full = _encode(tokenizer, prompt + record["output"])
            if eos is not None:
                full.append(eos)
            ex = _example(full, len(prompt_ids), max_len, mask_prompt)
            examples += [ex] if ex else []
    if not examples:
        raise DataError(f"{p}: empty dataset (no example with at least 2 tokens)")
    return examples


def load_token_stream(path: str | os.PathLike, tokenizer: Any = None) -> torch.Tensor:
    """All tokens of a data file as one 1-D int64 tensor, for perplexity.

    Alpaca records are rendered as prompt + output; documents are joined in file order.
    """
    p = Path(path)
    if _is_text_file(p):
        _require_tokenizer(tokenizer, p)
        ids = _encode_file(tokenizer, p)
        if len(ids) < 2:
            raise DataError(f"{p}: empty dataset (fewer than 2 tokens)")
        return torch.from_numpy(ids.astype(np.int64))
    else:
        content = read_records(p)
        ids = []
        for record in content:
            if "input_ids" in record:
                ids += record["input_ids"]
                continue
            _require_tokenizer(tokenizer, p)
            text = record["text"] if "text" in record else alpaca_prompt(record) + record["output"]
            ids += _encode(tokenizer, text)
    if len(ids) < 2:
        raise DataError(f"{p}: empty dataset (fewer than 2 tokens)")
    return torch.tensor(ids, dtype=torch.int64)


def check_vocab(examples: list[Example] | torch.Tensor, vocab_size: int, source: str) -> None:
    """Raise `DataError` if a token id does not exist in the model's vocabulary."""
    if isinstance(examples, torch.Tensor):
        top = int(examples.max())
    else:
        top = max(ex.input_ids.max() if isinstance(ex.input_ids, TokenSpan) else max(ex.input_ids)
                  for ex in examples)  # fmt: skip
    if top >= vocab_size:
        raise DataError(
            f"{source}: token id {top} is outside the model's vocabulary ({vocab_size})"
        )


def batch_order(
    n_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    lengths: list[int] | None = None,
) -> list[list[int]]:
    """Example indices of each batch in `epoch`: a permutation seeded by (seed, epoch).

    With `lengths` (one per example) the batches are length-grouped: the permutation is cut
    into mega-batches of 50 batches, each sorted by length (longest first) before it is cut
    into batches, so a batch pads little while the order stays random between mega-batches.
    The last partial batch is kept. Depends only on its arguments, so a resumed run can skip
    to any step and see the same batches.
    """
    if n_examples < 1 or batch_size < 1:
        raise ValueError(
            f"batch_order: need n_examples, batch_size >= 1, got {n_examples}, {batch_size}"
        )
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    perm = torch.randperm(n_examples, generator=g).tolist()
    if lengths is not None:
        if len(lengths) != n_examples:
            raise ValueError(f"batch_order: {len(lengths)} lengths for {n_examples} examples")
        mega = 50 * batch_size
        perm = [
            i
            for start in range(0, n_examples, mega)
            for i in sorted(perm[start : start + mega], key=lambda i: -lengths[i])
        ]
    return [perm[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (b, t), attention_mask (b, t), labels (b, t) with -100 pads."""
    t = max(len(ex.input_ids) for ex in examples)
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.int64)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.int64)
    attention = torch.zeros((b, t), dtype=torch.int64)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.from_numpy(np.asarray(ex.input_ids, dtype=np.int64))
        labels[row, :n] = torch.from_numpy(np.asarray(ex.labels, dtype=np.int64))
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
