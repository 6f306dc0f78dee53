"""What transformers' Trainer lacks for `spp train`, as TrainerCallbacks.

- `StopOnSignal`: SIGINT (Ctrl-C), SIGTERM (schedulers, Kubernetes) and SIGUSR1 (SLURM's
  warning before the time limit) finish the current optimizer step, save a checkpoint and
  stop; a second SIGINT aborts at once. A signal reaching one process stops them all.
- `StopAt`: stop (with a checkpoint) after step N of the run, or when a user callback asks.
- `NonFiniteGuard`: a step whose loss or gradient is not finite on any process is skipped
  (no optimizer update: every gradient is dropped) up to `limit` times; the next one raises
  NonFiniteError, keeping the checkpoints already written (all finite).
- `SealCheckpoints`: once every process has written checkpoint-N, the writing process adds
  its manifest (training.checkpoints) with the run's fingerprint and the counters above.
- `StderrProgress`: a progress bar and log lines on stderr (Trainer's own print to stdout,
  which `--json` keeps for the result).

Each callback that must agree across processes reduces its flag with `any_process` (the
maximum over the processes through the trainer's accelerator; identity on one process).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .checkpoints import rotate, write_checkpoint_manifest

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)

# The maximum of a small non-negative integer (or bool) over the processes.
AnyProcess = Callable[[int], int]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (more often than skip_nonfinite)."""


def _single(value: int) -> int:
    return value


class StopOnSignal(TrainerCallback):
    """Signal handlers for the length of `trainer.train()` (main thread only)."""

    def __init__(self, saves: bool, any_process: AnyProcess = _single) -> None:
        self.saves = saves
        self.any_process = any_process
        self.received: int | None = None  # the signal this process got
        self.stop_signal: int | None = None  # the signal that stopped the run (any process)
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        what = "saving a checkpoint and stopping" if self.saves else "stopping training"
        log.warning("%s: %s after this step", signal.Signals(signum).name, what)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Which signal: this process's, else SIGTERM for a stop another process received.
        if self.any_process(int(self.received is not None)):
            self.stop_signal = self.received or signal.SIGTERM
            if state.global_step < state.max_steps:
                control.should_save = self.saves
                control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (also when training raised)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class StopAt(TrainerCallback):
    """Stop with a checkpoint at step `step` (counting resumed steps), or when
    `ask(step, loss)` returns True after a step (loss: the last logged loss)."""

    def __init__(
        self,
        step: int | None,
        saves: bool,
        ask: Callable[[int, float], bool | None] | None = None,
        any_process: AnyProcess = _single,
    ) -> None:
        self.step, self.saves, self.ask, self.any_process = step, saves, ask, any_process
        self.stopped = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        asked = False
        if self.ask is not None:
            # The newest logged loss, found from the end: the history grows by a step a step.
            loss = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), math.nan)
            asked = bool(self.ask(state.global_step, loss))
        at = self.step is not None and state.global_step >= self.step
        if self.any_process(int(asked or at)) and state.global_step < state.max_steps:
            control.should_save = self.saves
            control.should_training_stop = True
            self.stopped = True


class NonFiniteGuard(TrainerCallback):
    """Skip (drop every gradient of) an optimizer step whose loss or gradient is not finite.

    The trainer reports each micro-batch's loss with `saw_loss`; the check runs before the
    optimizer step, on the gradients after their all-reduce (the same on every process
    under DDP; FSDP2 shards are combined with `any_process`).
    """

    def __init__(self, limit: int, any_process: AnyProcess = _single) -> None:
        self.limit = limit
        self.any_process = any_process
        self.skipped = 0
        self.last_skipped = False
        self.last_saved_step: int | None = None
        self._losses: list[torch.Tensor] = []

    def saw_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(()))

    def _bad_loss(self) -> float | None:
        """The first non-finite micro-batch loss of this step on this process (one sync)."""
        if not self._losses:
            return None
        losses, self._losses = torch.stack(self._losses), []
        bad = losses[~torch.isfinite(losses)]
        return float(bad[0]) if bad.numel() else None

    def check_loss_now(self, loss: torch.Tensor, step: int) -> None:
        """DeepSpeed steps inside backward: a non-finite loss stops the run before it."""
        self.saw_loss(loss)
        value = self._bad_loss()
        if self.any_process(int(value is not None)):
            self._fail("loss", value, step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
        grads = [_local(p.grad) for p in params if p.grad is not None]
        grads_finite = not grads or bool(
            torch.stack([torch.isfinite(g).all() for g in grads]).all()
        )
        bad_loss = self._bad_loss()
        # One reduction: 2 = a loss was not finite somewhere, 1 = only a gradient.
        code = 2 if bad_loss is not None else (0 if grads_finite else 1)
        worst = self.any_process(code)
        if not worst:
            self.last_skipped = False
            return
        self.skipped += 1
        if self.skipped > self.limit:
            what = "loss" if worst == 2 else "gradient"
            self._fail(what, bad_loss, state.global_step + 1)
        log.warning("non-finite loss or gradient at step %d: step skipped", state.global_step + 1)
        for p in params:
            p.grad = None  # torch's optimizers leave a parameter without gradient unchanged
        self.last_skipped = True

    def _fail(self, what: str, value: float | None, step: int) -> None:
        kept = (
            f"; the last finite checkpoint (step {self.last_saved_step}) is kept"
            if self.last_saved_step is not None
            else "; no checkpoint was written"
        )
        shown = "" if value is None else f" ({value})"
        raise NonFiniteError(
            f"non-finite {what}{shown} at step {step}{kept}; lower --lr, or pass --skip-nonfinite N"
        )

    def counters(self) -> dict[str, Any]:
        return {"skipped_nonfinite": self.skipped, "last_skipped": self.last_skipped}

    def restore(self, run: dict[str, Any], step: int) -> None:
        self.skipped = int(run.get("skipped_nonfinite", 0))
        self.last_skipped = bool(run.get("last_skipped", False))
        self.last_saved_step = step


def _local(t: torch.Tensor) -> torch.Tensor:
    local = getattr(t, "to_local", None)  # FSDP2: a DTensor gradient shard
    return local() if callable(local) else t


class SealCheckpoints(TrainerCallback):
    """Write checkpoint-N's manifest after Trainer saved it, then keep the newest `keep`
    sealed checkpoints (see training.checkpoints)."""

    def __init__(
        self,
        run: Callable[[], dict[str, Any]],
        is_main: bool,
        barrier: Callable[[], None],
        keep: int,
        guard: NonFiniteGuard | None = None,
    ) -> None:
        self.run, self.is_main, self.barrier, self.guard = run, is_main, barrier, guard
        self.keep = keep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.barrier()  # every process has written its files (rng_state_<rank>.pth, shards)
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.is_main and directory.is_dir():
            write_checkpoint_manifest(directory, self.run())
            rotate(args.output_dir, self.keep)
        if self.guard is not None:
            self.guard.last_saved_step = state.global_step
        self.barrier()


class StderrProgress(TrainerCallback):
    """A tqdm bar on stderr (rank 0) with loss, learning rate and tokens/s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                            unit="step")  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                 lr=f"{logs.get('learning_rate', math.nan):.2e}")  # fmt: skip

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
