"""TrainConfig (the paper's recipe as defaults), TrainResult, the step count and LR schedule.

Learning rate at 0-based step s of S (transformers' linear schedule): lr * s / W during the
W = ceil(warmup_ratio * S) warm-up steps, then lr * (S - s) / (S - W), decaying linearly
towards 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..utils.hyperparameters import option

# Fields that may change between a run and its resumption without changing the result.
RESUMABLE_FIELDS = (
    "save_every", "stop_after", "keep_checkpoints", "skip_nonfinite", "logging_steps", "report_to",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Hyper-parameters of `train`; the defaults are the SPP paper's recipe.

    batch_size is per process: N processes with batch_size B train on global batches of
    N * B examples (the same adapters as one process with batch_size N * B).
    keep_checkpoints: how many checkpoints stay on disk (a corrupt latest one falls back
    to the previous). skip_nonfinite: how many optimizer steps with a non-finite loss or
    gradient may be skipped before the run stops with an error. group_by_length: batches of
    examples of similar length (less padding), still a seeded, resumable order.
    """

    lr: float = option(4e-3, "peak learning rate")
    epochs: int = option(3, "epochs", minimum=1)
    batch_size: int = option(4, "micro-batch size per process", minimum=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", minimum=1)
    warmup_ratio: float = option(0.03, "warm-up fraction of the steps")
    weight_decay: float = option(0.001, "AdamW weight decay")
    max_grad_norm: float | None = 1.0
    max_steps: int | None = option(None, "cap on optimizer steps", minimum=1)
    seed: int = 0
    kd_weight: float = option(1.0, "weight of KL vs. CE with --teacher")
    kd_temperature: float = option(1.0, "distillation temperature")
    save_every: int = option(200, "checkpoint every N steps (Trainer's save_steps)",
                             flags=("--save-steps", "--save-every"), minimum=1)  # fmt: skip
    stop_after: int | None = option(None, "stop (with a checkpoint, exit 0) at step N of the "
                                    "run (counting resumed steps)", minimum=1)  # fmt: skip
    keep_checkpoints: int = option(2, "checkpoints kept on disk (Trainer's save_total_limit); "
                                   "a corrupt latest one falls back",
                                   flags=("--save-total-limit", "--keep-checkpoints"),
                                   minimum=1)  # fmt: skip
    skip_nonfinite: int = option(0, "steps with a non-finite loss or gradient to skip before "
                                 "failing", minimum=0)  # fmt: skip
    group_by_length: bool = option(False, "batch examples of similar length")
    logging_steps: int = option(1, "log loss and learning rate every N steps", minimum=1)
    report_to: str = option("none", "trackers for the logs, comma-separated, as Trainer's "
                            "report_to: tensorboard, wandb, mlflow, trackio, ... or none")  # fmt: skip

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
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.skip_nonfinite >= 0, "skip_nonfinite must be >= 0"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")


@dataclass
class TrainResult:
    """What a `train` call did: steps done of the total, losses, tokens, time, interruption
    (`stop_signal`: the signal number that stopped it, if one did), skipped steps
    (`last_skipped`: the last step taken was skipped as non-finite)."""

    step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    stop_signal: int | None = None
    skipped_nonfinite: int = 0
    last_skipped: bool = False
    log_history: list[dict] = field(default_factory=list)
    engine: str = "single process"  # "DDP", "FSDP2", "DeepSpeed ZeRO-3", ...

    @property
    def unusable(self) -> str | None:
        """Why the adapters are not the product of a run (every step, or the last one,
        skipped as non-finite), else None."""
        if self.step and self.skipped_nonfinite >= self.step:
            return f"every step ({self.step}) was skipped as non-finite"
        if self.last_skipped:
            return (
                f"the last step ({self.step} of {self.total_steps}) was skipped as non-finite "
                f"({self.skipped_nonfinite} skipped in all)"
            )
        return None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def total_steps(
    n_examples: int, config: TrainConfig, world_size: int = 1, global_batch: int | None = None
) -> int:
    """Optimizer steps of a run, as Trainer counts them: epochs * ceil(global batches per
    epoch / grad_accum) (the last step of an epoch may accumulate fewer), or max_steps
    when set; a global batch holds world_size * batch_size examples (or `global_batch`)."""
    if config.max_steps:
        return config.max_steps
    per_epoch = math.ceil(n_examples / (global_batch or config.batch_size * world_size))
    return config.epochs * math.ceil(per_epoch / config.grad_accum)


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Multiplier of the base learning rate at 0-based `step`: linear warm-up, linear decay."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
