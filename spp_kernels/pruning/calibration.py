"""Layer-by-layer calibration: find the decoder blocks, capture their inputs, replay them.

Wanda and SparseGPT prune one decoder block at a time. The calibration token ids run
through the embeddings once; the hidden states entering block 0 are kept; each block
then runs on those hidden states (collecting the statistics of its linear layers'
inputs), is pruned, and runs again so that its *pruned* outputs become the next block's
inputs. Peak memory is one block's activations plus the stored (nsamples, seqlen, hidden)
hidden states.

Transformers 5 decoder layers need keyword arguments from the model (rotary position
embeddings, the causal mask, position ids). Those are captured with forward pre-hooks
(with_kwargs=True) during one forward of the first sample through the dense model, one
set per block, so architectures whose blocks get different masks (sliding-window layers)
are replayed exactly; the remaining samples stop at block 0 with a sentinel exception.
Every sample has the same length and no padding, so the captured kwargs serve them all.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..utils.hf import find_decoder_layers, input_device, max_positions  # noqa: F401 (0.1's home)


def linear_targets(block: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers inside one decoder block, by name relative to the block."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _check_batch(batch: Any, where: str) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"calibration{where} must be a LongTensor of token ids (nsamples, seqlen) or an "
            f"iterable of them, got {type(batch).__name__}"
        )
    if batch.dtype != torch.long:
        raise TypeError(
            f"calibration{where} must hold token ids as torch.long (int64), got {batch.dtype}"
        )
    if batch.dim() not in (1, 2) or batch.numel() == 0:
        raise ValueError(
            f"calibration{where} must be a non-empty (nsamples, seqlen) or (seqlen,) tensor, "
            f"got shape {tuple(batch.shape)}"
        )
    return batch


def calibration_samples(
    calibration: Any,
    nsamples: int,
    seqlen: int | None,
    model: nn.Module,
) -> torch.Tensor:
    """Validate calibration token ids and return exactly (nsamples, seqlen) of them.

    calibration: a LongTensor (rows, length) (each row one sample), a 1-D LongTensor (a
    token stream cut into non-overlapping windows of seqlen tokens), or an iterable of
    such tensors, read until nsamples rows are gathered. seqlen=None uses the length of
    the first 2-D batch (for a stream: min(2048, the model's maximum length)); longer rows
    are truncated to seqlen, shorter ones are an error, as are too few rows, ids outside
    the vocabulary, and seqlen beyond the model's maximum length. Nothing is moved to the
    model's device here.
    """
    if calibration is None:
        raise ValueError(
            "this pruning method needs calibration token ids: pass calibration=LongTensor "
            "(nsamples, seqlen), e.g. tokenizer(text, return_tensors='pt').input_ids cut "
            "into windows (Wanda and SparseGPT use 128 samples of 2048 tokens from C4)"
        )
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if value is None and name == "seqlen":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    limit = max_positions(model)
    if seqlen is not None and limit is not None and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} exceeds the model's maximum length {limit}")
    batches = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    if not isinstance(batches, Iterable):
        raise TypeError(
            "calibration must be a LongTensor of token ids or an iterable of them, got "
            f"{type(calibration).__name__}"
        )
    rows: list[torch.Tensor] = []
    count = 0
    for index, batch in enumerate(batches):
        where = "" if isinstance(calibration, torch.Tensor) else f" batch {index}"
        batch = _check_batch(batch, where)
        if batch.dim() == 1:
            if seqlen is None:
                seqlen = min(2048, limit) if limit is not None else 2048
            windows = batch.numel() // seqlen
            batch = batch[: windows * seqlen].reshape(windows, seqlen)
        else:
            if seqlen is None:
                seqlen = batch.shape[1]
                if limit is not None and seqlen > limit:
                    raise ValueError(
                        f"calibration rows have {seqlen} tokens, more than the model's "
                        f"maximum length {limit}; pass seqlen=<= {limit}"
                    )
            if batch.shape[1] < seqlen:
                raise ValueError(
                    f"calibration{where} rows have {batch.shape[1]} tokens, fewer than "
                    f"seqlen={seqlen}"
                )
            batch = batch[:, :seqlen]
        take = batch[: nsamples - count]
        if take.numel():
            rows.append(take)
            count += take.shape[0]
        if count >= nsamples:
            break
    if count < nsamples:
        raise ValueError(
            f"calibration is too short: {count} samples of {seqlen} tokens, but nsamples="
            f"{nsamples}; pass more token ids or a smaller nsamples"
        )
    samples = torch.cat(rows).cpu()
    vocab = _vocab_size(model)
    low, high = int(samples.min()), int(samples.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(
            f"calibration token ids must lie in [0, {vocab}), got values in [{low}, {high}]"
        )
    return samples


class _StopForward(Exception):
    """Raised by the block-0 pre-hook to end a forward once its inputs are captured."""


@dataclass
class BlockInputs:
    """What the decoder blocks receive on the calibration data.

    hidden: one (1, seqlen, hidden) tensor per sample, the current block's inputs.
    extra_args: per block, the positional arguments after hidden_states (usually ()).
    kwargs: per block, the keyword arguments the model passed to that block.
    """

    hidden: list[torch.Tensor]
    extra_args: list[tuple]
    kwargs: list[dict[str, Any]]


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    accepts = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if accepts else {}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor
) -> BlockInputs:
    """Run the calibration samples up to block 0 and record every block's call arguments.

    samples: (nsamples, seqlen) token ids. The first sample runs through the whole dense
    model to record each block's kwargs; the others stop at block 0.
    """
    device = input_device(model)
    n_layers = len(layers)
    extra_args: list[tuple | None] = [None] * n_layers
    kwargs: list[dict | None] = [None] * n_layers
    hidden: list[torch.Tensor] = []
    state = {"stop": False}

    def make_hook(index: int):
        def hook(module, args, kw):
            kw = dict(kw)
            if args:
                h, rest = args[0], tuple(args[1:])
            else:
                h, rest = kw.pop("hidden_states"), ()
            if kwargs[index] is None:
                extra_args[index], kwargs[index] = rest, kw
            if index == 0:
                hidden.append(h.detach().clone())
                if state["stop"]:
                    raise _StopForward

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    call_kwargs = _forward_kwargs(model)
    try:
        for j in range(samples.shape[0]):
            state["stop"] = j > 0
            with contextlib.suppress(_StopForward):
                model(samples[j : j + 1].to(device), **call_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, kw in enumerate(kwargs) if kw is None]
    if missing or len(hidden) != samples.shape[0]:
        raise RuntimeError(
            f"the model's forward did not call decoder layers {missing}; cannot calibrate"
        )
    return BlockInputs(hidden=hidden, extra_args=extra_args, kwargs=kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """One decoder block on hidden (1, seqlen, hidden) with the captured arguments."""
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
