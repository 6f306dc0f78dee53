"""benchmarks.memory_estimate's per-engine totals add up from its per-part estimate."""

import pytest

from benchmarks import memory_estimate as me


def test_engine_totals_for_70b_on_8_gpus_add_up():
    c = me.SHAPES["LLaMA-2-70B"]
    parts = me.estimate(c, 8192, 8, 16, fsdp=True, ckpt=True)
    ddp = me.estimate(c, 8192, 8, 16, fsdp=False, ckpt=True)
    rows = me.totals(c, 8192, 8, 16)
    live = 1e9 * 2 / me.GIB
    step = parts["activations"] + parts["logits"]
    zero3 = parts["frozen dense"] + parts["adapters+grad+AdamW"] + live + step
    assert rows["ZeRO-3 /8, dense bf16"]["gpu"] == pytest.approx(zero3)
    offload = rows["ZeRO-3 /8 + CPU offload"]
    assert offload["gpu"] == pytest.approx(live + step)
    assert offload["host"] == pytest.approx(ddp["frozen dense"] + ddp["adapters+grad+AdamW"])
    # ZeRO-3 divides the dense weights by 8: less than DDP's packed copy, more than FSDP2's.
    assert rows["FSDP2 /8, packed 2:4"]["gpu"] < zero3 < rows["DDP, packed 2:4"]["gpu"]
    assert "| ZeRO-3 /8 + CPU offload | 16.0 | 130.1 |" in me.totals_table(8192, 8, 16)
