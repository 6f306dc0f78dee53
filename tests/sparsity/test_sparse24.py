"""2:4 inference path: pattern checks, packing, semi-structured conversion, compressed storage."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks.memory_estimate import llama_compressed_fraction
from spp_kernels.adapters.layer import SPPLinear
from spp_kernels.sparsity import sparse24
from spp_kernels.sparsity.nm import nm_packed_nbytes
from spp_kernels.sparsity.sparse24 import (
    SemiStructuredReport,
    check_2to4,
    compress,
    decompress,
    is_2to4,
    load_compressed,
    save_compressed,
    semi_structured_backend,
    to_semi_structured,
)
from spp_kernels.utils import shapes
from tests.helpers import make_tiny_llama

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def magnitude_2to4_(weight: torch.Tensor) -> None:
    """Zero, in place, the 2 smallest-magnitude entries of every group of 4 columns."""
    rows, cols = weight.shape
    groups = weight.detach().reshape(rows, cols // 4, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    groups.scatter_(-1, drop, 0.0)


def pruned_tiny_llama(dtype=torch.float16, seed=0, **cfg) -> nn.Module:
    model = make_tiny_llama(seed=seed, **cfg).to(dtype)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
                magnitude_2to4_(mod.weight)
    return model


def state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.uint8) for k, v in model.state_dict().items()}


def test_pattern_checks_name_layer_and_first_offending_group():
    w = torch.zeros(8, 16)
    w[:, 0::4] = 1.0
    w[:, 3::4] = 2.0
    assert is_2to4(w)
    check_2to4(w, name="ok")
    w[2, 6] = 5.0  # row 2, group 1 now has 3 nonzeros
    assert not is_2to4(w)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: .*row 2, group 1"):
        check_2to4(w, name="model.layers.0.mlp.up_proj")
    assert not is_2to4(torch.zeros(4, 6))  # 4 does not divide cols
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        check_2to4(torch.zeros(4, 6), name="x")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_compress_decompress_round_trip(dtype):
    w = torch.randn(48, 96).to(dtype)
    magnitude_2to4_(w)
    values, meta = compress(w)
    assert values.shape == (48, 48) and values.dtype == dtype
    assert meta.shape == (48, 3) and meta.dtype == torch.int32  # 24 groups, 8 per word
    back = decompress(values, meta)
    assert back.shape == w.shape
    assert torch.equal(back.view(torch.uint8), w.view(torch.uint8))
    with pytest.raises(ValueError, match="row 0, group 0"):
        compress(torch.ones(4, 8), name="dense")


def test_to_semi_structured_on_cpu_warns_and_leaves_model_unchanged():
    model = pruned_tiny_llama()
    before = state_bits(model)
    with pytest.warns(UserWarning, match="no layer converted"):
        out, report = to_semi_structured(model)
    assert out is model
    assert isinstance(report, SemiStructuredReport)
    assert report.backend is None and report.converted == []
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(report.skipped) == sorted(linears)
    assert all("CUDA" in reason for reason in report.skipped.values())
    assert "CUDA" in report.warning
    after = state_bits(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if isinstance(m, nn.Linear))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["num_converted"] == 0 and d["num_skipped"] == len(linears)


def test_to_semi_structured_rejects_bad_arguments():
    model = pruned_tiny_llama()
    with pytest.raises(ValueError, match="backend must be one of"):
        to_semi_structured(model, backend="cusparse")
    with pytest.raises(ValueError, match="no submodule named 'model.nope'"):
        to_semi_structured(model, modules=["model.nope"])
    with pytest.raises(TypeError, match="not an nn.Linear"):
        to_semi_structured(model, modules=["model.norm"])


def test_unmerged_spp_linear_is_refused_before_anything_changes():
    model = pruned_tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = SPPLinear.from_linear(attn.q_proj, r=4)
    before = state_bits(model)
    for call in (
        lambda: to_semi_structured(model),
        lambda: to_semi_structured(model, modules=["model.layers.1.mlp.up_proj"]),
        lambda: save_compressed(model, "/nonexistent/never/written"),
    ):
        with pytest.raises(
            ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*merge_and_unload"
        ):
            call()
    after = state_bits(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    attn.q_proj = attn.q_proj.merge()
    with pytest.warns(UserWarning):  # merged: accepted (and left dense on CPU)
        to_semi_structured(model)


def test_backend_resolution(monkeypatch):
    assert semi_structured_backend("cpu")[0] is None
    assert "CUDA GPU" in semi_structured_backend("cpu")[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def gpu(cc, cusparselt):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
        monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)

    gpu((9, 0), True)  # H100/H200
    assert semi_structured_backend("cuda:0") == ("cusparselt", None)
    assert semi_structured_backend("cuda:0", "cusparselt") == ("cusparselt", None)
    backend, reason = semi_structured_backend("cuda:0", "cutlass")
    assert backend is None and "8.x only" in reason
    gpu((9, 0), False)
    assert semi_structured_backend("cuda:0")[0] is None
    gpu((8, 0), True)  # A100
    assert semi_structured_backend("cuda:0") == ("cusparselt", None)
    assert semi_structured_backend("cuda:0", "cutlass") == ("cutlass", None)
    gpu((8, 6), False)
    assert semi_structured_backend("cuda:0") == ("cutlass", None)
    gpu((7, 5), True)
    assert "no sparse tensor cores" in semi_structured_backend("cuda:0")[1]
    with pytest.raises(ValueError, match="backend must be one of"):
        semi_structured_backend("cuda:0", "cusparse")
    with pytest.raises(ValueError, match="'cusparselt' or 'cutlass'"):
        sparse24.semi_structured_weight(torch.zeros(16, 16), "auto")


def test_layer_qualification_and_backend_flag(monkeypatch):
    """Selection logic with the GPU parts stubbed: which layers convert, the recorded reasons,
    and that _FORCE_CUTLASS is set for the conversion and restored afterwards."""
    model = pruned_tiny_llama()  # intermediate 96: down_proj has 96 input columns
    flags = []

    def fake_convert(w):
        flags.append(torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS)
        return w.clone()

    from spp_kernels.sparsity import semi_structured

    monkeypatch.setattr(
        semi_structured, "semi_structured_backend", lambda device, backend: ("cutlass", None)
    )
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake_convert)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    _, report = to_semi_structured(model, backend="cutlass")
    assert torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS is False  # restored
    assert flags and all(flags)
    assert report.backend == "cutlass"
    # CUTLASS fp16 tile in torch: rows % 32, cols % 64 (read from the class, not hard-coded here)
    limits = torch.sparse.SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
    for i in range(2):
        p = f"model.layers.{i}"
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"):
            assert f"{p}.{leaf}" in report.converted
        if 96 % limits.sparse_min_cols:
            assert "multiple of" in report.skipped[f"{p}.mlp.down_proj"]
    assert report.skipped["lm_head"].startswith("not 2:4 sparse")

    model32 = pruned_tiny_llama(dtype=torch.float32)
    _, report32 = to_semi_structured(model32, modules=["model.layers.0.self_attn.q_proj"])
    assert report32.converted == []
    assert "float16 or bfloat16" in report32.skipped["model.layers.0.self_attn.q_proj"]

    tied = pruned_tiny_llama(tie_word_embeddings=True)
    with torch.no_grad():
        magnitude_2to4_(tied.lm_head.weight)
    _, report_tied = to_semi_structured(tied, modules=["lm_head"])
    assert "tied" in report_tied.skipped["lm_head"]


def test_save_load_compressed_bit_exact(tmp_path):
    model = pruned_tiny_llama()
    manifest = save_compressed(model, tmp_path)
    packed = [k for k in manifest["packed"]]
    assert len(packed) == 2 * len(DECODER_LINEARS)
    assert "lm_head.weight" in manifest["dense"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",  # with the quantization_config that transformers loads it by
        "generation_config.json",
        "model_2to4.json",
        "model_2to4.safetensors",
    ]
    assert json.loads((tmp_path / "model_2to4.json").read_text())["packed"] == manifest["packed"]
    # linear weights alone: 56.25 % of their fp16 bytes; embeddings, lm_head, norms stay dense
    linear_dense = sum(model.get_parameter(k).numel() * 2 for k in packed)
    linear_packed = sum(
        nm_packed_nbytes(*model.get_parameter(k).shape, 2, 4, torch.float16) for k in packed
    )
    assert linear_packed / linear_dense == pytest.approx(0.5625)
    # the formula used for LLaMA-7B matches the tensor bytes actually written
    expected = llama_compressed_fraction(model.config)
    assert manifest["tensor_bytes"] / manifest["dense_bytes"] == pytest.approx(expected)
    assert expected < manifest["fraction_of_dense"] < expected + 0.05  # + file header
    print(f"tiny LLaMA compressed/dense bytes on disk: {manifest['fraction_of_dense']:.4f}")

    fresh = make_tiny_llama(seed=1).to(torch.float16)
    assert load_compressed(fresh, tmp_path) is fresh
    want, got = state_bits(model), state_bits(fresh)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_save_compressed_refuses_listed_non_2to4_layers(tmp_path):
    model = pruned_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(1.0)
    listed = ["model.layers.0.self_attn.q_proj", "lm_head", "model.layers.0.self_attn.o_proj"]
    with pytest.raises(
        ValueError, match=r"2 listed layer.*\n  lm_head: .*row 0, group 0.*\n  .*o_proj: "
    ):
        save_compressed(model, tmp_path / "out", modules=listed)
    assert not (tmp_path / "out").exists()


def test_tied_weights_stored_once_and_restored(tmp_path):
    model = pruned_tiny_llama(tie_word_embeddings=True)
    manifest = save_compressed(model, tmp_path)
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    fresh = make_tiny_llama(seed=3, tie_word_embeddings=True).to(torch.float16)
    load_compressed(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    want, got = state_bits(model), state_bits(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_load_compressed_rejects_mismatches_before_changing_anything(tmp_path):
    save_compressed(pruned_tiny_llama(), tmp_path)
    other = make_tiny_llama(seed=2, intermediate_size=128).to(torch.float16)
    before = state_bits(other)
    with pytest.raises(ValueError, match=r"gate_proj\.weight has shape \(128, 64\) in the model"):
        load_compressed(other, tmp_path)
    deeper = make_tiny_llama(seed=2, num_hidden_layers=3).to(torch.float16)
    with pytest.raises(ValueError, match=r"missing in the file \['model\.layers\.2"):
        load_compressed(deeper, tmp_path)
    after = state_bits(other)
    assert all(torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((tmp_path / "model_2to4.json").read_text())
    manifest["dense"] = manifest["dense"][1:]
    (tmp_path / "model_2to4.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="interrupted save"):
        load_compressed(make_tiny_llama().to(torch.float16), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_compressed(make_tiny_llama(), tmp_path / "missing")


def test_llama_7b_expected_fraction():
    from transformers import LlamaConfig

    cfg7b = LlamaConfig(**shapes.LLAMA_7B, tie_word_embeddings=False)
    fraction = llama_compressed_fraction(cfg7b)
    # linears 6.48e9 params at 0.5625, embeddings + lm_head 0.26e9 dense
    assert fraction == pytest.approx(0.5795, abs=0.001)


@pytest.mark.cuda
def test_cuda_converted_logits_match_dense_merged():
    torch.manual_seed(0)
    model = pruned_tiny_llama(intermediate_size=128).cuda()
    with torch.no_grad():  # an SPP fine-tune, merged: still 2:4
        for mod in list(model.modules()):
            for leaf in DECODER_LINEARS:
                if hasattr(mod, leaf):
                    spp = SPPLinear.from_linear(getattr(mod, leaf), r=4, init="both_random")
                    spp.alpha.normal_()
                    setattr(mod, leaf, spp.merge())
    ids = torch.randint(0, 128, (2, 24), device="cuda")
    with torch.no_grad():
        dense_logits = model(ids).logits.float()
    _, report = to_semi_structured(model)
    assert report.backend in ("cusparselt", "cutlass"), report.to_dict()
    assert len(report.converted) == 2 * len(DECODER_LINEARS), report.to_dict()
    assert "lm_head" in report.skipped
    with torch.no_grad():
        sparse_logits = model(ids).logits.float()
    torch.testing.assert_close(sparse_logits, dense_logits, atol=2e-2, rtol=2e-2)
    out = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)


@pytest.mark.cuda
def test_cuda_save_compressed_from_converted_model(tmp_path):
    model = pruned_tiny_llama(intermediate_size=128).cuda()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = to_semi_structured(model)
    assert report.converted, report.to_dict()
    manifest = save_compressed(model, tmp_path)  # semi-structured weights are unpacked first
    assert len(manifest["packed"]) == 2 * len(DECODER_LINEARS)
    fresh = make_tiny_llama(seed=5, intermediate_size=128).to(torch.float16).cuda()
    load_compressed(fresh, tmp_path)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, dense[key]), key
