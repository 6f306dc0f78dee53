"""SPP training under DDP and FSDP2 (fully_shard) on 2 CPU processes (gloo) vs one process.

Both ranks start from the same pruned tiny LLaMA and adapters; each rank gets half of every
global batch. With dropout 0 and a mean loss over equal token counts, the averaged
gradients equal the single-process full-batch gradients, so after the same SGD steps the
adapters, the merged weights and the saved adapter must match the single-process run, and
every zero of the frozen weights must survive bitwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from spp_kernels import SPPConfig, SPPModel, get_spp_model
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 2
LR = 0.5
CONFIG = dict(r=4, scale=2.0, dropout=0.0, init="both_random")


def pruned_spp() -> SPPModel:
    """The same adapter-wrapped, 50%-pruned tiny LLaMA in every process."""
    model = make_tiny_llama(seed=0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                w.masked_fill_(w.abs() < w.abs().median(), 0.0)
    torch.manual_seed(1)  # adapter init
    return get_spp_model(model, SPPConfig(**CONFIG))


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 128, (2 * WORLD, 10), generator=g)


def local_grads(spp: SPPModel) -> dict[str, torch.Tensor]:
    """Adapter gradients by adapter key ("<layer>.alpha"), gathered if sharded."""
    out = {}
    for name, p in spp.named_parameters():
        if p.requires_grad:
            g = p.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            out[name.removeprefix("base_model.")] = g.detach().clone()
    return out


def train(model: nn.Module, spp: SPPModel, rank: int, world: int) -> dict[str, torch.Tensor]:
    """STEPS SGD steps on this rank's slice of each global batch; first step's gradients."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    spp.train()
    first = {}
    for step in range(STEPS):
        ids = global_batch(step).chunk(world)[rank]
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            first = local_grads(spp)
        opt.step()
    return first


def merged_weights(spp: SPPModel) -> dict[str, torch.Tensor]:
    names = list(spp.spp_layers())
    merged = spp.merge_and_unload()
    return {n: merged.get_submodule(n).weight.detach().clone() for n in names}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = Path(out_dir)
        # DDP: the wrapper averages gradients across ranks.
        spp = pruned_spp()
        grads = train(DDP(spp), spp, rank, WORLD)
        if rank == 0:
            save_file(grads, str(out / "ddp_grads.safetensors"))
            save_file(merged_weights(spp), str(out / "ddp_merged.safetensors"))

        # FSDP2: shard every decoder layer, then the root; params become DTensors.
        spp = pruned_spp()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in spp.base_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(spp, mesh=mesh)
        assert hasattr(spp.spp_layers()["model.layers.0.self_attn.q_proj"].alpha, "full_tensor")
        grads = train(spp, spp, rank, WORLD)
        adapters = spp.adapter_state_dict()  # collective gather on every rank
        spp.save_pretrained(out / "fsdp_adapter")  # every rank calls; rank 0 writes
        if rank == 0:
            save_file(grads, str(out / "fsdp_grads.safetensors"))
            fresh = pruned_spp()
            fresh.load_adapter_state_dict(adapters)
            save_file(merged_weights(fresh), str(out / "fsdp_merged.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    out.mkdir()
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    ref = pruned_spp()
    zeros = {n: layer.weight == 0 for n, layer in ref.spp_layers().items()}
    ref_grads = train(ref, ref, rank=0, world=1)
    ref_adapters = ref.adapter_state_dict()
    ref_merged = merged_weights(ref)
    assert len(ref_grads) == 28

    for kind in ("ddp", "fsdp"):
        grads = load_file(str(out / f"{kind}_grads.safetensors"))
        assert grads.keys() == ref_grads.keys(), kind
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
        merged = load_file(str(out / f"{kind}_merged.safetensors"))
        assert merged.keys() == ref_merged.keys()
        for name, w in ref_merged.items():
            torch.testing.assert_close(merged[name], w, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
            assert torch.equal(merged[name] == 0, zeros[name]), f"{kind} {name}: zeros moved"

    # The adapter saved under FSDP2 loads into a plain model and equals the reference run.
    loaded = SPPModel.from_pretrained(make_tiny_llama(), out / "fsdp_adapter")
    for key, value in loaded.adapter_state_dict().items():
        torch.testing.assert_close(value, ref_adapters[key], rtol=1e-4, atol=1e-6, msg=key)
