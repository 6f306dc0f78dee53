"""The data hook of wiki_title_mc.yaml (lm-eval imports this file by path).

load() writes the task's docs (spp_kernels.datasets.wiki_title_mc_docs) once as JSON Lines
under spp_kernels.utils.io.cache_root() ($SPP_CACHE_DIR, default ~/.cache/spp-kernels) and loads them with the `json`
builder of Hugging Face datasets, offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def data_file() -> Path:
    """The task's JSON Lines file (written on first use)."""
    from spp_kernels.datasets import CORPUS_ID, TASK_SEED, wiki_title_mc_docs
    from spp_kernels.utils.io import atomic_write_text, cache_root

    root = cache_root()
    path = root / f"wiki_title_mc-{CORPUS_ID}-seed{TASK_SEED}.jsonl"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        docs = wiki_title_mc_docs()
        atomic_write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


def load(**kwargs: Any) -> Any:
    """A DatasetDict with the "test" split (called by lm-eval with the task metadata)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(data_file())})
