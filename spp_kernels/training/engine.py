"""The distributed engine of `spp train`: accelerate for processes, PyTorch FSDP2 for sharding.

A run launched by `torchrun` or `accelerate launch` (WORLD_SIZE > 1) uses
`accelerate.Accelerator`: it joins the process group torchrun set up (gloo on CPU, NCCL
on CUDA), picks each process's device, wraps the model in DistributedDataParallel (the
default) and does the reductions (`reduce`). With --fsdp the decoder blocks and the root
are sharded with PyTorch's FSDP2 `fully_shard` (MixedPrecisionPolicy: bf16 frozen weights
stay bf16, fp32 adapters stay fp32, gradients reduced in fp32) instead of accelerate's
FSDP plugin, which accelerate 1.15 ignores on CPU; it is the same engine accelerate calls
on GPUs. Full (unsharded) adapter and optimizer states for checkpoints come from
torch.distributed.checkpoint.state_dict (a collective under FSDP2; rank 0 writes).

No collective is written here by hand: every reduction, all-gather and shard goes through
accelerate or torch.distributed's FSDP2 / state-dict APIs. A single process (no
launcher) uses `LocalEngine`, with the same interface and no distributed machinery.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..utils.hf import find_decoder_layers

_FULL = dict(full_state_dict=True, cpu_offload=True)


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class LocalEngine:
    """One process, no distribution."""

    world_size = 1
    rank = 0
    is_main = True
    fsdp = False

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sum(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        yield

    def full_states(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(trainable parameters by name, optimizer state by parameter name), full tensors."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True, **self._full_options())
        return (
            get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options),
        )

    def load_full_states(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, params: dict, optim: dict
    ) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, params, options=options)
        set_optimizer_state_dict(
            model, optimizer, optim, options=StateDictOptions(full_state_dict=True)
        )

    def _full_options(self) -> dict[str, Any]:
        return {"full_state_dict": True}


class DistributedEngine(LocalEngine):
    """Several processes: accelerate's Accelerator, DDP or (fsdp=True) FSDP2."""

    def __init__(self, fsdp: bool = False) -> None:
        from accelerate import Accelerator

        # On a CPU-only machine Accelerator() ignores torchrun's environment unless cpu=True.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.fsdp = fsdp

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.fsdp:
            return self.accelerator.prepare_model(model)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Keep every parameter's own dtype (bf16 frozen weights, fp32 adapters); reduce in fp32.
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _, layers = find_decoder_layers(base)
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    def sum(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, reduction="sum")[0])

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """DDP: skip the gradient all-reduce on the micro-batches before the last one."""
        if sync or self.fsdp or not hasattr(model, "no_sync"):
            yield
        else:
            with model.no_sync():
                yield

    def _full_options(self) -> dict[str, Any]:
        return dict(_FULL)


def make_engine(fsdp: bool = False, device: str | torch.device = "cpu") -> LocalEngine:
    """DistributedEngine under a launcher (WORLD_SIZE > 1), else LocalEngine on `device`."""
    if launched_world_size() > 1:
        return DistributedEngine(fsdp=fsdp)
    if fsdp:
        raise ValueError("--fsdp needs several processes: launch with torchrun or accelerate")
    return LocalEngine(device)
