"""`train`: SPP adapters trained by transformers' Trainer (training.trainer), with what
Trainer lacks added as callbacks (training.callbacks) and checkpoints verified before a
resume (training.checkpoints).

Only the trainable parameters (SPP's alpha and beta) are optimised, with Trainer's AdamW
and its linear schedule: learning rate lr * s / W during the W = ceil(warmup_ratio * S)
warm-up steps, then lr * (S - s) / (S - W) (0-based step s of S). One optimizer step
accumulates `grad_accum` micro-batches of `batch_size` examples on each process; data
order is Trainer's seeded sampler (`seed`); Trainer restores the RNG states on resume, so
a run resumed from a checkpoint gives bit-identical adapters to one never interrupted
(one process, dropout included).

One process or several: under `torchrun` / `accelerate launch` Trainer's accelerator runs
DDP (the default), FSDP (`fsdp=True`, FSDP2, or an accelerate config file choosing it) or
DeepSpeed (`deepspeed=<json>`); N processes with batch B train on global batches of N * B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from .callbacks import (
    NonFiniteError,
    NonFiniteGuard,
    SealCheckpoints,
    StderrProgress,
    StopAt,
    StopOnSignal,
)
from .checkpoints import (
    CheckpointError,
    checkpoint_root,
    fingerprint_diff,
    latest_usable,
    legacy_message,
    legacy_run,
)
from .config import RESUMABLE_FIELDS, TrainConfig, TrainResult, lr_factor, total_steps
from .data import Example
from .trainer import token_loss

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


_DEEPSPEED_SKIP = (
    "train: skip_nonfinite needs the optimizer step to be skippable, which DeepSpeed does "
    "inside backward: use skip_nonfinite=0 with DeepSpeed"
)


def launched() -> tuple[int, int]:
    """(WORLD_SIZE, RANK) set by torchrun / accelerate launch; (1, 0) without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The directory of the newest verified checkpoint under `out_dir`, or None."""
    try:
        return latest_usable(out_dir, tidy=False)[0]
    except CheckpointError:
        return None


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad, in module order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    return params


def _fingerprint(
    config: TrainConfig, examples: list[Example], extra: dict[str, Any], world_size: int
) -> dict[str, Any]:
    """What a resume must not change. The batch is the global one (per-process batch x
    processes): a run may resume on another process count with the same global batch."""
    cfg = {
        k: v for k, v in asdict(config).items() if k not in RESUMABLE_FIELDS and k != "batch_size"
    }
    cfg["global_batch"] = config.batch_size * world_size
    fp = {"train_config": cfg, "n_examples": len(examples), **extra}
    return json.loads(json.dumps(fp, default=str))


def _report_to(value: str) -> list[str] | str:
    names = [v.strip() for v in value.split(",") if v.strip()]
    return "none" if not names or names == ["none"] else names


def training_arguments(
    config: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    saves: bool,
    use_cpu: bool,
    deepspeed: str | os.PathLike | dict | None = None,
    fsdp: bool = False,
    fsdp_layer_classes: list[str] | None = None,
    gradient_checkpointing: bool = False,
) -> Any:
    """TrainingArguments for `config` (the mapping of every TrainConfig field)."""
    from transformers import TrainingArguments

    fsdp_kwargs: dict[str, Any] = {}
    if fsdp:
        fsdp_config: dict[str, Any] = {"version": 2, "reshard_after_forward": True}
        if fsdp_layer_classes:
            fsdp_config["transformer_layer_cls_to_wrap"] = fsdp_layer_classes
        fsdp_kwargs = {"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp_config}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,  # < 1: a fraction of the steps (rounded up)
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm or 0.0,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,
        report_to=_report_to(config.report_to),
        save_strategy="steps" if saves else "no",
        save_steps=config.save_every,
        save_total_limit=None,  # SealCheckpoints rotates, after sealing the new one
        disable_tqdm=True,  # StderrProgress: stdout is the command's result
        remove_unused_columns=False,
        average_tokens_across_devices=True,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        use_cpu=use_cpu,
        deepspeed=deepspeed,
        **_checkpointing(TrainingArguments, gradient_checkpointing),
        **fsdp_kwargs,
    )


def _checkpointing(arguments: type, enabled: bool) -> dict[str, Any]:
    """Non-reentrant activation checkpointing, in transformers' spelling of the day
    (activation_checkpointing from 5.2x, gradient_checkpointing before)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    kwargs = {"use_reentrant": False} if enabled else None
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": kwargs}


@contextlib.contextmanager
def _no_kv_cache(*models: nn.Module | None) -> Iterator[None]:
    """A KV cache is useless in training and costs memory and copies in every forward."""
    configs = [getattr(m, "config", None) for m in models if m is not None]
    caches = [(c, c.use_cache) for c in configs if getattr(c, "use_cache", False)]
    for c, _ in caches:
        c.use_cache = False
    try:
        yield
    finally:
        for c, value in caches:
            c.use_cache = value


def _layer_classes(model: nn.Module) -> list[str]:
    from ..utils.hf import find_decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _, layers = find_decoder_layers(base)
    return sorted({type(layer).__name__ for layer in layers})


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
    deepspeed: str | os.PathLike | dict | None = None,
    fsdp: bool = False,
    gradient_checkpointing: bool = False,
) -> TrainResult:
    """Train the model's trainable parameters on `examples`; checkpoints go to `out_dir`.

    Args:
        model: a module whose forward(input_ids=, attention_mask=) returns `.logits`
            (b, t, vocab), e.g. an SPPModel; only parameters with requires_grad change.
        examples: the dataset (see `spp_kernels.training.data.load_dataset`), the same
            list on every process.
        teacher: optional frozen model for logit distillation (same vocabulary), replicated.
        resume: continue from the newest verified checkpoint in `out_dir` (error if none).
        fingerprint: extra JSON values (e.g. data digest, SPP config) stored with every
            checkpoint and required to match on resume.
        callback: called as callback(step, last logged loss) after every optimizer step
            (Trainer logs after the step's callbacks: the loss is the previous logged
            step's); returning True stops the run there (with a checkpoint), like
            `stop_after`.
        deepspeed, fsdp, gradient_checkpointing: passed to TrainingArguments (fsdp: FSDP2
            over the decoder layers).

    Returns a `TrainResult`; `interrupted` is True when a signal, `stop_after` or the
    callback ended the run early (a checkpoint was written first if `out_dir` is set).
    Raises NonFiniteError after more than `skip_nonfinite` non-finite steps, CheckpointError
    when `resume` finds no usable checkpoint of the same run.
    """
    from .trainer import ExampleCollator, ExampleDataset, SPPTrainer

    if not examples:
        raise ValueError("train: empty dataset")
    if resume and out_dir is None:
        raise ValueError("train: resume needs out_dir")
    if resume and (legacy := legacy_run(out_dir)) is not None:
        raise CheckpointError(legacy_message(legacy))
    trainable_named_parameters(model)
    if resume:
        config = _keep_the_global_batch(config, out_dir)
    device = next(model.parameters()).device
    single = launched()[0] == 1
    if single and device.type == "cuda" and (device.index or 0) != 0:
        # Trainer trains one process on cuda:0 (args.device): the model would move there.
        raise ValueError(
            f"train: the model is on {device}; one process trains on the first visible GPU: "
            f"run with CUDA_VISIBLE_DEVICES={device.index} and the model on cuda"
        )
    saves = out_dir is not None
    with contextlib.ExitStack() as stack:
        output_dir = out_dir if saves else stack.enter_context(tempfile.TemporaryDirectory())
        args = training_arguments(
            config, output_dir, saves=saves, use_cpu=device.type == "cpu", deepspeed=deepspeed, fsdp=fsdp, fsdp_layer_classes=_layer_classes(model) if fsdp
            else None, gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        if single and device.type == "cuda":
            args._n_gpu = 1  # one process, one GPU: never torch.nn.DataParallel over the rest
        guard = NonFiniteGuard(config.skip_nonfinite)
        trainer = SPPTrainer(
            model=model, args=args, train_dataset=ExampleDataset(examples),
            data_collator=ExampleCollator(pad_id), spp_config=config, teacher=teacher,
            guard=guard,
        )  # fmt: skip
        if trainer.is_deepspeed_enabled and config.skip_nonfinite:  # --deepspeed or a config
            raise ValueError(_DEEPSPEED_SKIP)
        any_process = trainer.any_process
        guard.any_process = any_process
        world = trainer.accelerator.num_processes
        is_main = trainer.accelerator.is_main_process
        extra = dict(fingerprint or {})
        if trainer.is_deepspeed_enabled:
            # ZeRO's optimizer states are saved per rank: a resume needs the same count.
            extra["deepspeed_processes"] = world
        fp = _fingerprint(config, examples, extra, world)
        signals = StopOnSignal(saves, any_process)
        stop_at = StopAt(config.stop_after, saves, callback, any_process)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        for cb in (guard, stop_at, signals, StderrProgress(progress)):
            trainer.add_callback(cb)
        if saves:
            seal = SealCheckpoints(
                lambda: {"fingerprint": fp, **guard.counters()}, is_main,
                trainer.accelerator.wait_for_everyone, config.keep_checkpoints, guard,
            )  # fmt: skip
            trainer.add_callback(seal)
        checkpoint = None
        if resume:
            checkpoint = _verified_checkpoint(out_dir, fp, trainer, guard)
        if teacher is not None:
            teacher.eval()
        start = time.perf_counter()
        try:
            with _no_kv_cache(model, teacher):
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            signals.restore()
        model.eval()
        state = trainer.state
        losses = [float(e["loss"]) for e in state.log_history if "loss" in e]
        interrupted = (signals.stop_signal is not None or stop_at.stopped) and (
            state.global_step < state.max_steps)  # fmt: skip
        return TrainResult(
            step=state.global_step,
            total_steps=state.max_steps,
            losses=losses,
            tokens=int(state.num_input_tokens_seen),
            seconds=time.perf_counter() - start,
            interrupted=interrupted,
            stop_signal=signals.stop_signal if interrupted else None,
            skipped_nonfinite=guard.skipped,
            last_skipped=guard.last_skipped,
            log_history=list(state.log_history),
            engine=trainer.engine_name(),
        )


def _keep_the_global_batch(config: TrainConfig, out_dir: str | os.PathLike) -> TrainConfig:
    """A run resumed on another process count keeps its global batch: --batch-size becomes
    global / processes (with a warning) when that divides evenly, else CheckpointError."""
    world, rank = launched()
    try:
        directory, run = latest_usable(out_dir, tidy=False)
    except CheckpointError:
        return config  # reported with the checkpoint check, after Trainer's set-up
    saved = run.get("fingerprint", {}).get("train_config", {}).get("global_batch")
    if not isinstance(saved, int) or saved == config.batch_size * world:
        return config
    if saved % world:
        raise CheckpointError(
            f"resume: {directory} was trained on global batches of {saved} examples, which "
            f"{world} processes cannot share evenly: resume on a process count dividing {saved}"
        )
    if rank == 0:
        log.warning(
            "resume: %s was trained on global batches of %d examples: kept on %d process(es), "
            "%d per process (--batch-size %d is not used)",
            directory, saved, world, saved // world, config.batch_size,
        )  # fmt: skip
    return dataclasses.replace(config, batch_size=saved // world)


def _verified_checkpoint(
    out_dir: str | os.PathLike, fp: dict[str, Any], trainer: Any, guard: NonFiniteGuard
) -> Path:
    """The newest verified checkpoint of this run (the writing process sets unusable ones
    aside first); CheckpointError naming what changed when it belongs to other settings."""
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        directory, run = latest_usable(out_dir, tidy=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        directory, run = latest_usable(out_dir, tidy=False)
    changed = fingerprint_diff(run.get("fingerprint", {}), fp)
    if changed:
        raise CheckpointError(
            f"resume: {directory} was trained with other settings: " + "; ".join(changed[:6])
        )
    step = int(directory.name.rpartition("-")[2])
    guard.restore(run, step)
    if accelerator.is_main_process:
        log.info("resuming from %s (step %d)", directory, step)
    return directory
