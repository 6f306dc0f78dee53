"""The torch backend's small-p dropout path through the dropped entries (ops.sparse_dropout):
float64 oracles, the same mask, poisoned buffers, chunks, and where it is (not) taken."""

from __future__ import annotations

import math

import pytest
import torch

from spp_kernels import spp_linear
from spp_kernels.ops import chunked, sparse_dropout
from spp_kernels.ops.dropout import draw_keep_bits, unpack_keep_mask
from spp_kernels.ops.reference import spp_linear_naive
from spp_kernels.sparsity.packed import PackedWeight
from tests.helpers import TOL, NaNEmptyTorch, assert_close

CASES = [  # (tokens, m, n, r, p, weight, bias, chunk fraction of W)
    (7, 37, 29, 5, 0.05, "dense", True, None),
    (13, 40, 24, 8, 0.1, "2:4", False, None),
    (33, 48, 40, 16, 0.05, "2:4", True, 3),  # several chunks of whole groups
    (21, 37, 29, 5, 0.1, "dense", True, 4),  # chunks across groups (r does not divide m)
    (64, 16, 72, 1, 0.08, "dense", False, None),
]


def _weight(m, n, kind, dtype):
    w = torch.randn(m, n, dtype=dtype)
    if kind == "dense":
        return w * (torch.rand(m, n) > 0.5)
    keep = torch.rand(m, n // 4, 4).argsort(-1) < 2
    return PackedWeight.from_dense(w * keep.view(m, n).to(dtype), 2, 4)


def _grads(fn, x, w, alpha, beta, bias, dy, **kw):
    leaves = [
        None if t is None else t.detach().clone().requires_grad_() for t in (x, alpha, beta, bias)
    ]
    y = fn(leaves[0], w, leaves[1], leaves[2], leaves[3], **kw)
    y.backward(dy)
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-r{c[3]}-p{c[4]}-{c[5]}"
)
def test_matches_the_float64_oracle_with_poisoned_buffers(case, dtype, monkeypatch):
    tokens, m, n, r, p, kind, with_bias, fraction = case
    fake = NaNEmptyTorch()
    monkeypatch.setattr(sparse_dropout, "torch", fake)
    if fraction:
        monkeypatch.setattr(chunked, "CHUNK_BYTES", m * n * dtype.itemsize // fraction)
    calls = []
    for name in ("forward", "backward_dx"):
        real = getattr(sparse_dropout, name)
        monkeypatch.setattr(
            sparse_dropout, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a)
        )
    weight = _weight(m, n, kind, dtype)
    w64 = (weight.dense() if kind != "dense" else weight).double()
    x = torch.randn(2, tokens, n, dtype=dtype)
    alpha = torch.randn(r, n, dtype=dtype) / math.sqrt(n)
    beta = torch.randn(m, dtype=dtype)
    bias = torch.randn(m, dtype=dtype) if with_bias else None
    dy = torch.randn(2, tokens, m, dtype=dtype)
    kw = dict(scale=1.7, dropout_p=p, seed=1234)
    ours = _grads(
        lambda *a, **k: spp_linear(*a, backend="torch", **k), x, weight, alpha, beta, bias, dy, **kw
    )
    ref = _grads(
        spp_linear_naive,
        *(None if t is None else t.double() for t in (x, w64, alpha, beta, bias)),
        dy.double(),
        **kw,
    )
    assert calls == ["forward", "backward_dx"], calls
    assert fake.poisoned >= 2
    for got, want, name in zip(ours, ref, ("y", "dx", "dalpha", "dbeta", "dbias")):
        if want is not None:
            assert got.dtype == dtype
            assert_close(got, want, dtype=dtype, name=name)


def test_equals_the_two_gemm_path_and_reads_the_same_mask(monkeypatch):
    """float32: the sparse path and the dense dropout path agree to float32 rounding, and
    the dropped entries are exactly the mask's zeros (padding bits excluded)."""
    tokens, m, n, r = 40, 48, 29, 4
    bits = draw_keep_bits(tokens, n, 0.1, 5, "cpu")
    dropped = sparse_dropout.dropped_entries(bits, n)
    want = (~unpack_keep_mask(bits, n)).nonzero()
    assert torch.equal(dropped.flat, want[:, 0] * n + want[:, 1])
    assert torch.equal(dropped.cols.long(), want[:, 1]) and dropped.cols.dtype == torch.int32
    assert torch.equal(dropped.crow.diff(), torch.bincount(want[:, 0], minlength=tokens))
    assert dropped.csr(torch.ones(len(want))).to_dense().eq(0).eq(unpack_keep_mask(bits, n)).all()

    x, weight = torch.randn(tokens, n), torch.randn(m, n)
    alpha, beta, dy = torch.randn(r, n), torch.randn(m), torch.randn(tokens, m)
    kw = dict(scale=2.0, dropout_p=0.1, seed=5)
    sparse = _grads(
        lambda *a, **k: spp_linear(*a, backend="torch", **k), x, weight, alpha, beta, None, dy, **kw
    )
    monkeypatch.setattr(sparse_dropout, "MAX_P", 0.0)
    dense = _grads(
        lambda *a, **k: spp_linear(*a, backend="torch", **k), x, weight, alpha, beta, None, dy, **kw
    )
    for a, b in zip(sparse[:4], dense[:4]):
        assert_close(a, b.double(), tol=TOL[torch.float32])


def test_no_dropped_entry_and_empty_inputs():
    """A draw that keeps everything (p below 2**-17 rounds to q = 0) and zero tokens."""
    m, n, r = 24, 16, 4
    weight, alpha, beta = (
        torch.randn(m, n, dtype=torch.float64),
        torch.randn(r, n, dtype=torch.float64),
        torch.randn(m, dtype=torch.float64),
    )
    kw = dict(scale=1.3, dropout_p=1e-6, seed=9)
    x = torch.randn(5, n, dtype=torch.float64)
    dy = torch.randn(5, m, dtype=torch.float64)
    bits = draw_keep_bits(5, n, 1e-6, 9, "cpu")
    assert sparse_dropout.applies(torch.zeros(5, n, dtype=torch.float64), 1e-6, bits)
    assert sparse_dropout.dropped_entries(bits, n).flat.numel() == 0
    ours = _grads(
        lambda *a, **k: spp_linear(*a, backend="torch", **k), x, weight, alpha, beta, None, dy, **kw
    )
    ref = _grads(spp_linear_naive, x, weight, alpha, beta, None, dy, **kw)
    for a, b in zip(ours[:4], ref[:4]):
        assert_close(a, b)
    for p in (0.05, 0.3):  # the sparse and the two-GEMM path (both failed on 0 tokens)
        empty = torch.zeros(0, n, dtype=torch.float64, requires_grad=True)
        y = spp_linear(empty, weight, alpha, beta, dropout_p=p, seed=1, backend="torch")
        y.sum().backward()
        assert y.shape == (0, m) and empty.grad.shape == (0, n)


@pytest.mark.parametrize(
    "dtype,p,taken",
    [
        (torch.float32, 0.05, True),
        (torch.float64, 0.1, True),
        (torch.float32, 0.0, False),
        (torch.float32, 0.25, False),  # past the measured break-even: two dense GEMMs
        (torch.bfloat16, 0.05, False),  # torch's CPU CSR kernels have no half types
        (torch.float16, 0.05, False),
    ],
)
def test_taken_only_where_it_pays_and_torch_has_the_kernels(dtype, p, taken, monkeypatch):
    calls = []
    for name in ("forward", "backward_dx"):
        real = getattr(sparse_dropout, name)
        monkeypatch.setattr(
            sparse_dropout, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a)
        )
    x = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(12, 16, dtype=dtype)
    alpha = torch.randn(4, 16, requires_grad=True)
    beta = torch.randn(12, requires_grad=True)
    spp_linear(x, weight, alpha, beta, dropout_p=p, seed=3, backend="torch").sum().backward()
    assert calls == (["forward", "backward_dx"] if taken else []), calls
    # The adapter term alone (with_base=False) keeps its one GEMM at any p.
    calls.clear()
    spp_linear(
        x, weight, alpha, beta, dropout_p=p, seed=3, backend="torch", with_base=False
    ).sum().backward()
    assert not calls


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_partial_gradients_equal_the_two_gemm_path(with_base, need, monkeypatch):
    """torch_backend.backward with only dX, only dalpha/dbeta, and the adapter term alone,
    in float64 over three chunks (r does not divide m): the same numbers both ways."""
    from spp_kernels.ops import torch_backend

    tokens, m, n, r, p = 19, 45, 24, 4, 0.1
    monkeypatch.setattr(chunked, "CHUNK_BYTES", m * n * 8 // 3)
    x, weight = torch.randn(tokens, n, dtype=torch.float64), _weight(m, n, "2:4", torch.float64)
    alpha, beta = torch.randn(r, n, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    dy = torch.randn(tokens, m, dtype=torch.float64)
    bits = draw_keep_bits(tokens, n, p, 3, "cpu")
    assert sparse_dropout.applies(x, p, bits)
    kw = dict(need_dx=need[0], need_dalpha_dbeta=need[1], with_base=with_base)
    sparse = torch_backend.backward(dy, x, weight, alpha, beta, 1.5, p, bits, **kw)
    monkeypatch.setattr(sparse_dropout, "MAX_P", 0.0)
    dense = torch_backend.backward(dy, x, weight, alpha, beta, 1.5, p, bits, **kw)
    for a, b, wanted in zip(sparse, dense, (need[0], need[1], need[1])):
        assert (a is None) == (b is None) == (not wanted)
        if wanted:
            assert_close(a, b)


def test_the_sampled_product_reads_dy_in_chunks_of_the_budget(monkeypatch):
    """sampled_addmm copies its (tokens, rows) column slice of dY: with more tokens than
    features the chunks shrink so that the copy stays within the chunk budget."""
    tokens, m, n, r = 96, 64, 16, 8
    budget = m * n * 4 // 4
    monkeypatch.setattr(chunked, "CHUNK_BYTES", budget)
    seen = []
    real = torch.sparse.sampled_addmm
    monkeypatch.setattr(
        torch.sparse, "sampled_addmm", lambda *a, **k: seen.append(a[1].shape) or real(*a, **k)
    )
    x = torch.randn(tokens, n, requires_grad=True)
    alpha, beta = torch.randn(r, n, requires_grad=True), torch.randn(m, requires_grad=True)
    spp_linear(
        x, torch.randn(m, n), alpha, beta, dropout_p=0.1, seed=2, backend="torch"
    ).sum().backward()
    assert len(seen) > 1 and all(rows * cols * 4 <= budget for rows, cols in seen), seen


def test_user_warnings_keep_their_once_per_location_record():
    """Building the CSR matrices must not reset Python's record of shown warnings (a
    catch_warnings block per call would make a once-per-location warning repeat)."""
    import warnings

    args = (torch.randn(8, 16), torch.randn(12, 16), torch.randn(4, 16), torch.randn(12))
    spp_linear(*args, dropout_p=0.1, seed=1, backend="torch")  # torch's own notice is past
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            warnings.warn("a user's notice", UserWarning, stacklevel=1)
            spp_linear(*args, dropout_p=0.1, seed=1, backend="torch")
    assert [str(w.message) for w in seen] == ["a user's notice"]
