"""Evaluation of (pruned) causal LMs: perplexity and lm-eval zero-shot tasks.

perplexity follows the Wanda / SparseGPT WikiText-2 protocol: the token stream is cut
into nsamples = numel // seqlen non-overlapping windows (the tail is dropped), each
window's mean next-token negative log-likelihood over its seqlen - 1 predicted tokens is
weighted by seqlen, and

    ppl = exp( sum_w nll_w * seqlen / (nsamples * seqlen) )  = exp(mean_w nll_w).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .utils.hf import input_device, max_positions


def _check_token_ids(token_ids: Any) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"token_ids must be a LongTensor, got {type(token_ids).__name__}")
    if token_ids.dtype != torch.long:
        raise TypeError(f"token_ids must be torch.long (int64), got {token_ids.dtype}")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(
            f"token_ids must be 1-D (tokens,) or (1, tokens), got shape {tuple(token_ids.shape)}"
        )
    return token_ids


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity of a causal LM on a token stream over non-overlapping seqlen windows.

    Args:
        model: a causal LM returning `.logits` (batch, seqlen, vocab).
        token_ids: (tokens,) or (1, tokens) LongTensor, e.g. the WikiText-2 test split
            joined with "\\n\\n" and tokenized once.
        seqlen: window length; must not exceed the model's maximum length.
        batch_size: windows per forward (the result does not depend on it).
        progress: tqdm bar over batches.

    Runs on the model's device in eval mode (restoring the previous mode); logits are
    upcast to float32 for the cross-entropy.
    """
    token_ids = _check_token_ids(token_ids)
    for name, value in (("seqlen", seqlen), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one predicted token), got {seqlen}")
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise ValueError(
            f"seqlen={seqlen} exceeds the model's maximum length {limit} "
            f"(config.max_position_embeddings); pass seqlen<={limit}"
        )
    nsamples = token_ids.numel() // seqlen
    if nsamples == 0:
        raise ValueError(
            f"token_ids has {token_ids.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    windows = token_ids[: nsamples * seqlen].reshape(nsamples, seqlen)
    if int(windows.min()) < 0 or (vocab is not None and int(windows.max()) >= vocab):
        raise ValueError(f"token_ids must lie in [0, {vocab})")

    device = input_device(model)
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    try:
        starts = range(0, nsamples, batch_size)
        for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits = model(batch, use_cache=False).logits
            # (tokens, vocab) rows: on CPU, float32 cross-entropy over the (batch, vocab, seq)
            # layout accumulates visibly worse (about 1.5e-4 nats per token on SmolLM2).
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            nll = F.cross_entropy(flat, batch[:, 1:].reshape(-1), reduction="none").view(
                batch.shape[0], -1
            )  # (batch, seqlen - 1)
            nll_sum += (nll.double().mean(dim=1) * seqlen).sum().cpu()
    finally:
        model.train(was_training)
    return math.exp(float(nll_sum) / (nsamples * seqlen))


_LM_EVAL_MISSING = (
    "zero_shot needs EleutherAI's lm-eval with its Hugging Face backend: "
    "pip install 'spp-kernels[eval]'  (or: pip install 'lm-eval[hf]')"
)


def _load_lm_eval():
    # datasets reads these when imported: lm-eval runs offline, from local or cached data.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(f"{_LM_EVAL_MISSING} ({exc})") from exc
    return simple_evaluate, HFLM, TaskManager


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str,
    num_fewshot: int = 0,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval tasks on an in-memory model; returns lm-eval's per-task metrics (its
    "results" dict, e.g. {"wiki_title_mc": {"acc,none": 0.61, ...}}).

    A thin wrapper over `lm_eval.simple_evaluate(model=HFLM(pretrained=model,
    tokenizer=tokenizer, batch_size=...), tasks=..., num_fewshot=..., limit=...,
    task_manager=TaskManager(include_path=spp_kernels/lmeval_tasks))`; extra kwargs go to
    simple_evaluate. Tasks: the local `wiki_title_mc` (see spp_kernels.lmeval_tasks) and
    any built-in lm-eval task (boolq, rte, hellaswag, winogrande, arc_easy,
    arc_challenge, openbookqa, ...), whose data must be in the Hugging Face datasets cache:
    runs are offline (HF_DATASETS_OFFLINE=1 unless set). Needs `pip install spp-kernels[eval]`.
    """
    from .lmeval_tasks import LOCAL_TASKS, TASK_DIR

    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    simple_evaluate, HFLM, TaskManager = _load_lm_eval()
    # Indexing lm-eval's ~15,000 built-in tasks takes about 20 s: only when one is asked for.
    manager = TaskManager(
        include_path=str(TASK_DIR), include_defaults=any(t not in LOCAL_TASKS for t in tasks)
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, **kwargs)  # fmt: skip
    except (OSError, ConnectionError) as exc:
        raise RuntimeError(
            f"lm-eval could not load the data of tasks {tasks}: {exc}. Download them once "
            "with network access (they are cached under ~/.cache/huggingface/datasets, or "
            "HF_DATASETS_CACHE) by running once with HF_DATASETS_OFFLINE=0, then rerun"
        ) from exc
    if out is None:  # lm-eval returns None on non-zero ranks
        return {}
    return out["results"]
