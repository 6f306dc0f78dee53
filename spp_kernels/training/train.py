"""The SPP training loop: AdamW, warm-up then linear decay, checkpoints that resume exactly,
on one process or several (see spp_kernels.training.engine).

Only the trainable parameters of the model (SPP's alpha and beta) are optimised. One
optimizer step accumulates `grad_accum` micro-batches of `world_size * batch_size`
examples (each process takes its `batch_size` slice); the loss of a step is the
token-weighted mean over all of them:

    CE  = -sum_t log p_student(y_t | y_<t) / T_tokens
    KD  = T^2 * sum_t KL(softmax(z_teacher,t / T) || softmax(z_student,t / T)) / T_tokens
    loss = CE                                    (no teacher)
    loss = kd_weight * KD + (1 - kd_weight) * CE (with a teacher, e.g. the dense model)

over the positions t whose label is not -100, T_tokens counted over the whole step on
every process (known from the data plan, no communication): N processes with batch B
compute the same gradients as one process with batch N * B (up to summation order; with
dropout > 0 the masks differ, each process drawing its own).

Reproducibility: the data order of each epoch is a permutation seeded by (seed, epoch),
and torch's generator is re-seeded from (seed, micro-batch index, rank) before each
micro-batch, so dropout masks depend only on the position in the run: a run resumed from
a checkpoint gives bit-identical adapters to one never interrupted (one process; to fp32
rounding on several).

Stops: SIGINT (Ctrl-C), SIGTERM (schedulers) and SIGUSR1 (SLURM's warning before the time
limit) finish the current step, write a checkpoint and return with `stop_signal` set. A
non-finite loss or gradient skips the step (up to `skip_nonfinite` times) or stops the run
with NonFiniteError, keeping the last finite checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.seeding import derive_seed
from .checkpoints import (
    CheckpointError,
    checkpoint_root,
    fingerprint_diff,
    load_latest,
    save_checkpoint,
)
from .config import RESUMABLE_FIELDS, TrainConfig, TrainResult, lr_factor, total_steps
from .data import IGNORE_INDEX, Example, batch_order, collate
from .engine import LocalEngine

log = logging.getLogger(__name__)

__all__ = [
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "checkpoint_root",
    "latest_checkpoint",
    "lr_factor",
    "token_loss",
    "total_steps",
    "train",
]

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (more often than skip_nonfinite)."""


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The directory of the newest usable checkpoint under `out_dir`, or None."""
    try:
        return load_latest(out_dir)[0]
    except CheckpointError:
        return None


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad, in module order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    return params


def token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    config: TrainConfig,
) -> tuple[torch.Tensor, int]:
    """Summed (not averaged) loss over the predicted positions and their count.

    logits, teacher_logits: (b, t, vocab); labels: (b, t) with -100 where no loss is taken.
    Position t predicts labels[t + 1].
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    student = logits[:, :-1][keep].float()
    ce = F.cross_entropy(student, target[keep], reduction="sum")
    if teacher_logits is None or config.kd_weight == 0.0:
        return ce, n
    temp = config.kd_temperature
    teacher = teacher_logits[:, :-1][keep].float()
    kd = F.kl_div(
        F.log_softmax(student / temp, dim=-1),
        F.log_softmax(teacher / temp, dim=-1),
        log_target=True,
        reduction="sum",
    ) * (temp * temp)
    return config.kd_weight * kd + (1.0 - config.kd_weight) * ce, n


class _StopFlag:
    """Handlers for SIGINT / SIGTERM / SIGUSR1 while training: the first asks for a clean
    stop after the current step (with a checkpoint); a second SIGINT aborts at once."""

    def __init__(self, saves: bool) -> None:
        self.signal: int | None = None
        self.saves = saves
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        what = "saving a checkpoint and stopping" if self.saves else "stopping training"
        log.warning("%s: %s after this step", signal.Signals(signum).name, what)

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ---------------------------------------------------------------------------------------
# Data plan
# ---------------------------------------------------------------------------------------


def _micro_batches(examples: list[Example], config: TrainConfig, size: int) -> list[list[int]]:
    """Example indices of every global micro-batch (`size` examples) of the run."""
    lengths = [len(e.input_ids) for e in examples] if config.group_by_length else None
    return [
        batch
        for epoch in range(config.epochs)
        for batch in batch_order(len(examples), size, config.seed, epoch, lengths=lengths)
    ]


def _rank_slice(batch: list[int], rank: int, size: int) -> list[int]:
    return batch[rank * size : (rank + 1) * size]


def _counted_tokens(examples: list[Example], indices: list[int]) -> int:
    return sum(sum(t != IGNORE_INDEX for t in examples[i].labels[1:]) for i in indices)


def _placeholder(example: Example) -> Example:
    """An example that contributes nothing (every label ignored): a process whose slice of
    the last, partial batch is empty still runs forward and backward with the others."""
    return Example(example.input_ids, tuple(IGNORE_INDEX for _ in example.labels))


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------


def _fingerprint(
    config: TrainConfig, examples: list[Example], extra: dict[str, Any], world_size: int
) -> dict[str, Any]:
    cfg = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_FIELDS}
    return {"train_config": cfg, "n_examples": len(examples), "world_size": world_size, **extra}


def _resumed_global_batch(
    saved: dict[str, Any], now: dict[str, Any], engine: Any, where: Path
) -> int:
    """The global batch of a resumed run: the checkpoint's. On another process count the
    run keeps it (each process takes ceil(global / processes) examples of every global
    batch, so the data order and the steps are unchanged) and `now` is made comparable."""
    world = engine.world_size
    saved_world = int(saved.get("world_size", world))
    saved_batch = int(saved.get("train_config", {}).get("batch_size", 0) or 0)
    if saved_world == world or saved_batch <= 0:
        return int(now["train_config"]["batch_size"]) * world
    global_batch = saved_world * saved_batch
    if engine.is_main:
        log.warning(
            "resume: %s was trained on %d processes, this run has %d: the global batch of %d "
            "examples is kept (%d per process; --batch-size is not used)",
            where, saved_world, world, global_batch, math.ceil(global_batch / world),
        )  # fmt: skip
    now["world_size"] = saved_world
    now["train_config"]["batch_size"] = saved_batch
    return global_batch


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    changed = fingerprint_diff(saved, now)
    if changed:
        raise CheckpointError(
            f"resume: {where} was trained with other settings: " + "; ".join(changed[:6])
        )


def _grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """The total gradient norm (clipping to max_norm when given); nan/inf when not finite."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    limit = max_norm if max_norm is not None else float("inf")
    total = torch.nn.utils.clip_grad_norm_(grads, limit)
    full = getattr(total, "full_tensor", None)  # FSDP2: a DTensor norm
    return float(full() if callable(full) else total)


def train(
    model: nn.Module,
    examples: list[Example],
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    teacher: nn.Module | None = None,
    resume: bool = False,
    pad_id: int = 0,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
    engine: LocalEngine | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on `examples`; checkpoints go to `out_dir`.

    Args:
        model: a module whose forward(input_ids=, attention_mask=) returns `.logits`
            (b, t, vocab); only parameters with requires_grad are updated. Under a
            DistributedEngine pass the model already wrapped (`engine.wrap`).
        examples: the dataset (see `spp_kernels.training.data.load_dataset`), the same
            list on every process.
        teacher: optional frozen model for logit distillation (same vocabulary), replicated.
        resume: continue from the newest usable checkpoint in `out_dir` (error if none).
        fingerprint: extra JSON values (e.g. data digest, SPP config) stored in the
            checkpoint and required to match on resume.
        callback: called as callback(step, loss) after every optimizer step; returning
            True stops the run there (with a checkpoint), like `stop_after`.
        engine: LocalEngine (default) or DistributedEngine.

    Returns a `TrainResult`; `interrupted` is True when a signal, `stop_after` or the
    callback ended the run early (a checkpoint was written first if `out_dir` is set).
    Raises NonFiniteError after more than `skip_nonfinite` non-finite steps.
    """
    engine = engine or LocalEngine()
    if not examples:
        raise ValueError("train: empty dataset")
    if resume and out_dir is None:
        raise ValueError("train: resume needs out_dir")
    params = trainable_named_parameters(model)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(
        [p for _, p in params], lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999)
    )
    world, rank = engine.world_size, engine.rank
    fp = json.loads(json.dumps(_fingerprint(config, examples, fingerprint or {}, world)))
    global_batch = config.batch_size * world
    if resume:
        ckpt, saved, saved_params, saved_optim = load_latest(out_dir, tidy=engine.is_main)
        saved_fp = saved.get("fingerprint", {})
        global_batch = _resumed_global_batch(saved_fp, fp, engine, ckpt)
        _check_resumable(saved_fp, fp, ckpt)
    total = total_steps(len(examples), config, world, global_batch)
    plan = _micro_batches(examples, config, global_batch)
    local_size = math.ceil(global_batch / world)
    result = TrainResult(step=0, total_steps=total)
    if resume:
        engine.load_full_states(model, optimizer, saved_params, saved_optim)
        result.step = int(saved["step"])
        result.losses = list(saved.get("losses", []))
        result.tokens = int(saved.get("tokens", 0))
        result.skipped_nonfinite = int(saved.get("skipped_nonfinite", 0))
        result.last_skipped = bool(saved.get("last_skipped", False))
        if engine.is_main:
            log.info("resuming from %s (step %d of %d)", ckpt, result.step, total)

    def checkpoint() -> None:
        if out_dir is None:
            return
        full_params, full_optim = engine.full_states(model, optimizer)  # a collective
        if engine.is_main:
            state = {
                "step": result.step,
                "total_steps": total,
                "tokens": result.tokens,
                "losses": result.losses,
                "skipped_nonfinite": result.skipped_nonfinite,
                "last_skipped": result.last_skipped,
                "fingerprint": fp,
                "run_config": asdict(config),
            }
            save_checkpoint(out_dir, full_params, full_optim, state, keep=config.keep_checkpoints)
        engine.barrier()

    from tqdm.auto import tqdm

    model.train()
    if teacher is not None:
        teacher.eval()
    # A KV cache is useless in training and costs memory and copies in every forward.
    configs = [getattr(m, "config", None) for m in (model, teacher) if m is not None]
    caches = [(c, c.use_cache) for c in configs if getattr(c, "use_cache", False)]
    for c, _ in caches:
        c.use_cache = False
    start = time.perf_counter()
    tokens_at_start = result.tokens
    bar = tqdm(
        total=total, initial=result.step, desc="train", unit="step",
        disable=not (progress and engine.is_main),
    )  # fmt: skip
    last_saved = result.step if resume else None
    try:
        with _StopFlag(saves=out_dir is not None) as stop:
            while result.step < total:
                step = result.step
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total, config.warmup_ratio)
                micro = plan[step * config.grad_accum : (step + 1) * config.grad_accum]
                n_tokens = sum(_counted_tokens(examples, b) for b in micro)
                optimizer.zero_grad(set_to_none=True)
                step_loss, step_tokens = 0.0, 0
                for k, global_batch in enumerate(micro):
                    local = _rank_slice(global_batch, rank, local_size)
                    rows = [examples[i] for i in local] or [_placeholder(examples[global_batch[0]])]
                    batch = collate(rows, pad_id)
                    step_tokens += int(batch["attention_mask"].sum()) if local else 0
                    # Re-seeding per micro-batch makes dropout a function of the position in
                    # the run, which is what lets a resumed run match an uninterrupted one.
                    micro_index = step * config.grad_accum + k
                    torch.manual_seed(derive_seed(config.seed, micro_index * world + rank))
                    inputs = {
                        "input_ids": batch["input_ids"].to(device),
                        "attention_mask": batch["attention_mask"].to(device),
                    }
                    with engine.no_sync(model, sync=k == len(micro) - 1):
                        logits = model(**inputs).logits
                        teacher_logits = None
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(**inputs).logits
                        loss_sum, _ = token_loss(
                            logits, batch["labels"].to(device), teacher_logits, config
                        )
                        # DDP / FSDP average gradients over processes: scale by the world size.
                        loss = loss_sum * (world / max(1, n_tokens))
                        loss.backward()
                    step_loss += float(loss_sum.detach()) / max(1, n_tokens)
                step_loss = engine.sum(step_loss)
                norm = _grad_norm([p for _, p in params], config.max_grad_norm)
                if not (math.isfinite(step_loss) and math.isfinite(norm)):
                    result.skipped_nonfinite += 1
                    if result.skipped_nonfinite > config.skip_nonfinite:
                        what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                        kept = "" if out_dir is None else (
                            f"; the last finite checkpoint (step {last_saved}) is kept"
                            if last_saved is not None else "; no checkpoint was written"
                        )  # fmt: skip
                        raise NonFiniteError(
                            f"non-finite {what} ({step_loss if what == 'loss' else norm}) at step "
                            f"{step + 1}{kept}; lower --lr, or pass --skip-nonfinite N"
                        )
                    log.warning("non-finite loss or gradient at step %d: step skipped", step + 1)
                    optimizer.zero_grad(set_to_none=True)
                    result.last_skipped = True
                else:
                    optimizer.step()
                    result.last_skipped = False
                result.step += 1
                result.tokens += int(engine.sum(step_tokens))
                result.losses.append(step_loss)
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{step_loss:.4f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    tok_s=f"{(result.tokens - tokens_at_start) / max(elapsed, 1e-9):.0f}",
                )
                bar.update(1)
                asked = bool(callback(result.step, step_loss)) if callback is not None else False
                stopping = engine.any(
                    asked
                    or stop.requested
                    or (config.stop_after is not None and result.step >= config.stop_after)
                )
                if stopping or result.step % config.save_every == 0 or result.step == total:
                    checkpoint()
                    last_saved = result.step
                if stopping and result.step < total:
                    result.interrupted = True
                    result.stop_signal = stop.signal
                    break
    finally:
        bar.close()
        for c, value in caches:
            c.use_cache = value
    if result.step != last_saved:
        checkpoint()
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
