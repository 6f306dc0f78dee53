"""SPP training on transformers' Trainer: the dataset, the collator, the loss and the arguments.

Why `Trainer` and not TRL's `SFTTrainer`: `spp train` reads its data itself (Alpaca with
the prompt masked, text windows, token-id files, the offline Wikipedia split) into
examples of input_ids and labels, so SFTTrainer's dataset preparation (and its `datasets`
dependency) has nothing to do; what remains of SFTTrainer is Trainer. SFTTrainer trains
SPP too (`SFTTrainer(..., peft_config=SPPConfig(...))`, tested in tests/adapters).

Loss of one optimizer step, over every micro-batch of every process:

    CE   = -sum_t log p_student(y_t | y_<t) / T
    KD   = tau^2 * sum_t KL(softmax(z_teacher,t / tau) || softmax(z_student,t / tau)) / T
    loss = CE                                      (no teacher)
    loss = kd_weight * KD + (1 - kd_weight) * CE   (with a teacher, e.g. the dense model)

over the positions t whose label is not -100, T counted over the whole step on every
process (Trainer's `num_items_in_batch` with `average_tokens_across_devices`): N processes
with batch B compute the gradients of one process with batch N * B (up to summation order;
with dropout > 0 each process draws its own masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .callbacks import NonFiniteGuard
from .config import TrainConfig
from .data import IGNORE_INDEX, Example, collate


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


class ExampleDataset(torch.utils.data.Dataset):
    """Examples as Trainer's dataset: {"input_ids": tuple, "labels": tuple} per item (the
    layout Trainer's length-grouped sampler reads)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, tuple[int, ...]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


class ExampleCollator:
    """Right-padded batches (training.data.collate). Label 0 of every row is set to -100:
    no position predicts it, so Trainer's token count (labels != -100) is the loss's."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate([Example(i["input_ids"], i["labels"]) for i in items], self.pad_id)
        batch["labels"][:, 0] = IGNORE_INDEX
        return batch


class SPPTrainer(Trainer):
    """Trainer with SPP's loss (cross-entropy, or distillation from `teacher`), normalised by
    the tokens of the whole optimizer step, and the non-finite check of `guard`."""

    # compute_loss divides by num_items_in_batch: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        spp_config: TrainConfig,
        teacher: nn.Module | None = None,
        guard: NonFiniteGuard | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.spp_config = spp_config
        self.teacher = teacher
        self.guard = guard
        # Makes Trainer count the step's tokens (num_items_in_batch) for compute_loss.
        self.model_accepts_loss_kwargs = True

    def create_accelerator_and_postprocess(self) -> None:
        if self._deepspeed_requested() and not torch.cuda.is_available():
            _skip_deepspeed_cpu_inference_op()
        super().create_accelerator_and_postprocess()
        _fsdp2_on_cpu(self)

    def _deepspeed_requested(self) -> bool:
        import os

        return bool(self.args.deepspeed) or os.environ.get(
            "ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # fmt: skip

    def engine_name(self) -> str:
        """What runs the processes, as observed: "single process", "DDP", "FSDP2",
        "FSDP1", "DeepSpeed ZeRO-N"."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED:
            plugin = self.accelerator.state.deepspeed_plugin
            stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
            return f"DeepSpeed ZeRO-{stage}"
        if kind == DistributedType.FSDP:
            return "FSDP2" if getattr(self.accelerator, "is_fsdp2", False) else "FSDP1"
        return "single process" if self.accelerator.num_processes == 1 else "DDP"

    def any_process(self, value: int) -> int:
        """The maximum of `value` over the processes (a collective when there are several)."""
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([int(value)], device=self.accelerator.device, dtype=torch.int64)
        return int(self.accelerator.reduce(t, reduction="max")[0])

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        labels = inputs["labels"]
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        outputs = model(**forward)
        teacher_logits = None
        if self.teacher is not None and self.spp_config.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(**forward).logits
        loss_sum, n = token_loss(outputs.logits, labels, teacher_logits, self.spp_config)
        if num_items_in_batch is None:
            loss = loss_sum / max(n, 1)
        else:
            count = num_items_in_batch.clamp_min(1) if torch.is_tensor(num_items_in_batch) else (
                max(int(num_items_in_batch), 1))  # fmt: skip
            loss = loss_sum / count
            if self.args.average_tokens_across_devices:
                # DDP / FSDP / DeepSpeed average gradients over processes.
                loss = loss * self.accelerator.num_processes
        if self.guard is not None:
            if self.is_deepspeed_enabled:
                self.guard.check_loss_now(loss, self.state.global_step + 1)
            else:
                self.guard.saw_loss(loss)
        return (loss, outputs) if return_outputs else loss


def _fsdp2_on_cpu(trainer: Trainer) -> None:
    """FSDP2 on CPU processes (gloo), as on GPUs.

    accelerate 1.16 switches a run to FSDP only for GPU-like process groups
    (AcceleratorState, state.py): on CPU it drops the FSDP plugin it built (from `--fsdp` /
    fsdp_config, or from an accelerate config file's FSDP_* environment) without a word and
    wraps the model in DDP. This attaches the plugin as accelerate does on GPUs, with full
    state dicts (Trainer's checkpoints then hold peft-openable adapters). FSDP version 1
    does not run on CPU (torch: "Inconsistent compute device and device_id"): refused.
    """
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if trainer.args.fsdp_plugin_args is not None:
        plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()
    else:
        return
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP version 1 does not run on CPU processes: use FSDP2 (--fsdp, or fsdp_version: 2 "
            "in the accelerate config file)"
        )
    plugin.set_state_dict_type("FULL_STATE_DICT")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def _skip_deepspeed_cpu_inference_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts
    (about 2 minutes, and a compiler), used only by its inference_all_reduce: training on
    CPU processes never calls it (ZeRO-2 adapters bit-identical with and without it,
    DeepSpeed 0.19.8). Marking it incompatible makes DeepSpeed skip the build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
