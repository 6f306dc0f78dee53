"""The SPP training loop: AdamW, linear warm-up then linear decay, checkpoints that resume exactly.

Only the trainable parameters of the model (SPP's alpha and beta) are optimised. One
optimizer step accumulates `grad_accum` micro-batches; the loss of a step is the
token-weighted mean over them:

    CE  = -sum_t log p_student(y_t | y_<t) / T_tokens
    KD  = T^2 * sum_t KL(softmax(z_teacher,t / T) || softmax(z_student,t / T)) / T_tokens
    loss = CE                                    (no teacher)
    loss = kd_weight * KD + (1 - kd_weight) * CE (with a teacher, e.g. the dense model)

over the positions t whose label is not -100. Learning rate at step s (0-based) of S:
lr * (s + 1) / W during the W = ceil(warmup_ratio * S) warm-up steps, then
lr * (S - s) / (S - W), decaying linearly towards 0.

Reproducibility: the data order of each epoch is a permutation seeded by (seed, epoch) and
torch's generator is re-seeded from (seed, micro-batch index) before each micro-batch, so
dropout masks depend only on the position in the run. A run resumed from a checkpoint
therefore produces bit-identical adapters to one that was never interrupted.

Checkpoints (every `save_every` steps, on Ctrl-C and at the end) live in
``out_dir/checkpoints/step-<N>/``: ``adapter.safetensors`` (trainable tensors),
``optimizer.safetensors`` (AdamW moments and step counts) and ``trainer_state.json``.
Each file is written atomically, and ``checkpoints/latest.json`` is switched to the new
step only after all three exist, so a crash at any moment leaves the previous checkpoint
usable. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.io import atomic_save_safetensors, atomic_write_text
from ..utils.seeding import derive_seed
from .data import IGNORE_INDEX, Example, batch_order, collate

log = logging.getLogger("spp_kernels.train")

CHECKPOINT_FORMAT = 1
# Fields that may change between a run and its resumption without changing the result.
_RESUMABLE_FIELDS = ("save_every", "stop_after")


@dataclass
class TrainConfig:
    """Hyper-parameters of `train`; the defaults are the SPP paper's recipe."""

    lr: float = 4e-3
    epochs: int = 3
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.001
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    seed: int = 0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    save_every: int = 200
    stop_after: int | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (0.0 <= self.kd_weight <= 1.0, "kd_weight must be in [0, 1]"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (self.save_every >= 1, "save_every must be >= 1"),
            (self.stop_after is None or self.stop_after >= 1, "stop_after must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")


@dataclass
class TrainResult:
    """What a `train` call did: steps done of the total, losses, tokens, time, interruption."""

    step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def total_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimizer steps of a run: ceil(epochs * batches_per_epoch / grad_accum), capped by max_steps."""
    per_epoch = math.ceil(n_examples / config.batch_size)
    steps = math.ceil(config.epochs * per_epoch / config.grad_accum)
    return min(steps, config.max_steps) if config.max_steps else steps


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Multiplier of the base learning rate at 0-based `step`: linear warm-up, linear decay."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad, in module order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    return params


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    """SIGINT handler for the duration of training: the first Ctrl-C asks for a checkpoint
    and a clean stop after the current step; a second one aborts at once."""

    def __init__(self, saves: bool) -> None:
        self.requested = False
        self.saves = saves
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        what = "saving a checkpoint and stopping" if self.saves else "stopping training"
        log.warning("interrupt: %s after this step (Ctrl-C again to abort)", what)

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The directory of the last complete checkpoint under `out_dir`, or None."""
    pointer = checkpoint_root(out_dir) / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{pointer}: unreadable checkpoint pointer ({e})") from None
    path = checkpoint_root(out_dir) / name
    if not (path / "trainer_state.json").exists():
        raise ValueError(f"{pointer}: points to {path}, which is incomplete")
    return path


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of a checkpoint directory (step, configs, fingerprint, losses)."""
    path = Path(checkpoint) / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable trainer state ({e})") from None


def save_checkpoint(
    out_dir: str | os.PathLike,
    params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint for `state["step"]` and make it the latest one."""
    root = checkpoint_root(out_dir)
    step = int(state["step"])
    directory = root / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step), "format": str(CHECKPOINT_FORMAT)}
    atomic_save_safetensors(
        {n: p.detach() for n, p in params}, directory / "adapter.safetensors", meta
    )
    moments: dict[str, torch.Tensor] = {}
    for i, (name, _) in enumerate(params):
        for key, value in optimizer.state_dict()["state"].get(i, {}).items():
            moments[f"{name}::{key}"] = torch.as_tensor(value)
    atomic_save_safetensors(moments, directory / "optimizer.safetensors", meta)
    atomic_write_text(directory / "trainer_state.json", json.dumps(state, indent=2))
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "dir": directory.name}))
    for old in root.glob("step-*"):
        if old.is_dir() and old != directory:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint(
    checkpoint: str | os.PathLike,
    params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Restore trainable tensors and AdamW state in place; returns the trainer state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(checkpoint)
    state = read_trainer_state(directory)
    for fname in ("adapter.safetensors", "optimizer.safetensors"):
        with safe_open(str(directory / fname), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
        if step != str(state["step"]):
            raise ValueError(
                f"{directory / fname}: step {step} != trainer state step {state['step']}"
            )
    adapter = load_file(str(directory / "adapter.safetensors"))
    names = [n for n, _ in params]
    if sorted(adapter) != sorted(names):
        missing = sorted(set(names) - set(adapter))[:3]
        extra = sorted(set(adapter) - set(names))[:3]
        raise ValueError(
            f"{directory}: checkpoint does not match the model's adapters "
            f"(missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, p in params:
            if adapter[name].shape != p.shape:
                raise ValueError(
                    f"{directory}: {name} has shape {tuple(adapter[name].shape)}, "
                    f"model expects {tuple(p.shape)}"
                )
            p.copy_(adapter[name])
    moments = load_file(str(directory / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, _, slot = key.rpartition("::")
        opt_state.setdefault(names.index(name), {})[slot] = value
    sd = optimizer.state_dict()
    sd["state"] = opt_state
    optimizer.load_state_dict(sd)
    return state


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------


def _micro_batches(n_examples: int, config: TrainConfig) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) of every micro-batch of the run, in order."""
    out = []
    for epoch in range(config.epochs):
        out += [(epoch, b) for b in batch_order(n_examples, config.batch_size, config.seed, epoch)]
    return out


def _fingerprint(
    config: TrainConfig, examples: list[Example], extra: dict[str, Any]
) -> dict[str, Any]:
    cfg = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE_FIELDS}
    return {"train_config": cfg, "n_examples": len(examples), **extra}


def _check_fingerprint(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    for key in sorted(set(saved) | set(now)):
        if key == "train_config":
            for k in sorted(set(saved.get(key, {})) | set(now.get(key, {}))):
                a, b = saved.get(key, {}).get(k), now.get(key, {}).get(k)
                if a != b:
                    raise ValueError(f"resume: {where} was trained with {k}={a!r}, now {k}={b!r}")
        elif saved.get(key) != now.get(key):
            raise ValueError(
                f"resume: {where} was trained with {key}={saved.get(key)!r}, now {now.get(key)!r}"
            )


def _accumulate_gradients(
    model: nn.Module,
    teacher: nn.Module | None,
    batches: list[dict[str, torch.Tensor]],
    config: TrainConfig,
    first_micro: int,
    device: torch.device,
) -> float:
    """Backward of one optimizer step's token-weighted loss over its micro-batches."""
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    step_loss = 0.0
    for k, batch in enumerate(batches):
        # Re-seeding per micro-batch makes dropout a function of the position in the run,
        # which is what lets a resumed run match an uninterrupted one bitwise.
        torch.manual_seed(derive_seed(config.seed, first_micro + k))
        inputs = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }
        logits = model(**inputs).logits
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
        loss_sum, _ = token_loss(logits, batch["labels"].to(device), teacher_logits, config)
        loss = loss_sum / max(1, n_tokens)
        loss.backward()
        step_loss += float(loss.detach())
    return step_loss


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
) -> TrainResult:
    """Train the model's trainable parameters on `examples`; checkpoints go to `out_dir`.

    Args:
        model: a module whose forward(input_ids=, attention_mask=) returns `.logits`
            (b, t, vocab); only parameters with requires_grad are updated.
        examples: the dataset (see `spp_kernels.data.load_dataset`).
        teacher: optional frozen model for logit distillation (same vocabulary).
        resume: continue from the latest checkpoint in `out_dir` (error if none).
        fingerprint: extra JSON values (e.g. data digest, SPP config) stored in the
            checkpoint and required to match on resume.
        callback: called as callback(step, loss) after every optimizer step; returning
            True stops the run there (with a checkpoint), like `stop_after`.

    Returns a `TrainResult`; `interrupted` is True when Ctrl-C, `stop_after` or the callback ended the run
    early (a checkpoint was written first if `out_dir` is set).
    """
    if not examples:
        raise ValueError("train: empty dataset")
    if resume and out_dir is None:
        raise ValueError("train: resume needs out_dir")
    params = trainable_named_parameters(model)
    device = _device_of(model)
    optimizer = torch.optim.AdamW(
        [p for _, p in params], lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999)
    )
    total = total_steps(len(examples), config)
    plan = _micro_batches(len(examples), config)
    fp = _fingerprint(config, examples, fingerprint or {})
    result = TrainResult(step=0, total_steps=total)
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise ValueError(f"resume: no checkpoint in {checkpoint_root(out_dir)}")
        saved = read_trainer_state(ckpt)
        _check_fingerprint(saved.get("fingerprint", {}), json.loads(json.dumps(fp)), ckpt)
        load_checkpoint(ckpt, params, optimizer)
        result.step = int(saved["step"])
        result.losses = list(saved.get("losses", []))
        result.tokens = int(saved.get("tokens", 0))
        log.info("resuming from %s (step %d of %d)", ckpt, result.step, total)

    def checkpoint() -> None:
        if out_dir is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": result.step,
            "total_steps": total,
            "tokens": result.tokens,
            "losses": result.losses,
            "fingerprint": fp,
            "run_config": asdict(config),
        }
        save_checkpoint(out_dir, params, optimizer, state)

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
    bar = tqdm(total=total, initial=result.step, desc="train", unit="step", disable=not progress)
    last_saved = result.step
    try:
        with _StopFlag(saves=out_dir is not None) as stop:
            while result.step < total:
                step = result.step
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total, config.warmup_ratio)
                micro = plan[step * config.grad_accum : (step + 1) * config.grad_accum]
                batches = [collate([examples[i] for i in idx], pad_id) for _, idx in micro]
                optimizer.zero_grad(set_to_none=True)
                step_loss = _accumulate_gradients(
                    model, teacher, batches, config, step * config.grad_accum, device
                )
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm)
                optimizer.step()
                result.step += 1
                result.tokens += int(sum(int(b["attention_mask"].sum()) for b in batches))
                result.losses.append(step_loss)
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{step_loss:.4f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    tok_s=f"{(result.tokens - tokens_at_start) / max(elapsed, 1e-9):.0f}",
                )
                bar.update(1)
                asked = bool(callback(result.step, step_loss)) if callback is not None else False
                stopping = (
                    asked
                    or stop.requested
                    or (config.stop_after is not None and result.step >= config.stop_after)
                )
                if stopping or result.step % config.save_every == 0 or result.step == total:
                    checkpoint()
                    last_saved = result.step
                if stopping and result.step < total:
                    result.interrupted = True
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
