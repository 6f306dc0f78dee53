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


def test_low_bit_formats_match_the_issues_arithmetic_and_the_70b_int4_step_fits_48_gb():
    """Issue 22's figures for LLaMA-2-70B's 68.45 B linear weights (decimal GB): dense bf16
    137, packed 2:4 bf16 77 (values 68.5 + metadata 8.6), 2:4 int8 / FP8 about 43, 2:4 int4
    (group 128) about 26, bitsandbytes NF4 about 35."""
    c = me.SHAPES["LLaMA-2-70B"]
    proj, layers = me.projections(c), c["num_hidden_layers"]
    assert layers * sum(m * n for m, n in proj) == pytest.approx(68.45e9, rel=1e-3)

    def linear_gb(fmt):
        return layers * sum(me.format_nbytes(fmt, m, n) for m, n in proj) / 1e9

    expected = {"dense bf16": 137, "2:4 bf16": 77, "2:4 int8": 43, "2:4 fp8": 43,
                "2:4 int4": 26, "bnb NF4": 35}  # fmt: skip
    for fmt, gb in expected.items():
        assert linear_gb(fmt) == pytest.approx(gb, rel=0.03), fmt
    int4 = me.one_gpu_step(c, "2:4 int4", 8192, 16)
    assert int4["total"] < 48  # GiB: a 48 GB GPU
    assert me.one_gpu_step(c, "bnb NF4", 8192, 16)["total"] > 48  # dense NF4 does not fit


def _bnb_layer_nbytes(layer) -> int:
    """Bytes a bitsandbytes layer holds for its weight: the codes and every scale tensor of
    its quantization state (nested absmax, code tables, offsets)."""
    weight = layer.weight
    total = weight.data.numel() * weight.data.element_size()
    state = getattr(weight, "quant_state", None)
    if state is None:  # int8: one float32 absmax per row
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB
        return total + scb.numel() * scb.element_size()
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    return total + sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("fmt", ["bnb int8", "bnb NF4"])
def test_bitsandbytes_bytes_measured_on_smollm2_projections_match_the_estimate(fmt):
    """The embedded SmolLM2-135M's seven projections (their real shapes, quantized by
    bitsandbytes on CPU as from_pretrained does): measured bytes within 1 % of
    format_nbytes (the estimate leaves out the 1 KB code tables)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from spp_kernels.utils.shapes import SMOLLM2_135M

    shapes = me.projections(SMOLLM2_135M)
    assert (192, 576) in shapes  # k_proj: three key-value heads of 64
    measured = estimated = 0
    for m, n in shapes:
        w = torch.randn(m, n)
        if fmt == "bnb int8":
            layer = bnb.nn.Linear8bitLt(n, m, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(n, m, bias=False, quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)  # fmt: skip
        measured += _bnb_layer_nbytes(layer.to("cpu"))
        estimated += me.format_nbytes(fmt, m, n)
    assert measured == pytest.approx(estimated, rel=0.01)


@pytest.mark.parametrize("fmt", ["2:4 int8", "2:4 fp8", "2:4 int4"])
def test_low_bit_nm_bytes_measured_on_smollm2_projections_match_the_estimate(fmt):
    """The seven projections of the embedded SmolLM2-135M (real shapes), pruned 2:4 and
    stored by spp_kernels.sparsity.lowbit: codes + scales + metadata bytes within 1 % of
    format_nbytes. int4 uses 32 kept values per scale (128 does not divide SmolLM2's 288)."""
    import torch

    from spp_kernels.pruning.masks import nm_mask
    from spp_kernels.sparsity.lowbit import QuantizedPackedWeight
    from spp_kernels.utils.shapes import SMOLLM2_135M

    group = 32
    measured = estimated = 0
    for m, n in me.projections(SMOLLM2_135M):
        w = torch.randn(m, n, dtype=torch.bfloat16)
        w = w.masked_fill(~nm_mask(w.abs().float(), 2, 4), 0.0)
        measured += QuantizedPackedWeight.from_dense(w, 2, 4, fmt[4:], group).nbytes
        estimated += me.format_nbytes(fmt, m, n, group_size=group)
    assert measured == pytest.approx(estimated, rel=0.01)
