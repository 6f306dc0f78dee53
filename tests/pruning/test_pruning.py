"""Pruning: masks, sparsity parsing, magnitude and Wanda against straightforward
reimplementations, calibration capture, exact sparsity on tiny decoders, the sparsity
report, bad input leaving the model untouched, and the hand-off to SPPLinear."""

import copy

import pytest
import torch
from torch import nn

from spp_kernels import SPPLinear
from spp_kernels.pruning import (
    find_decoder_layers,
    nm_mask,
    parse_sparsity,
    prune,
    sparsity_report,
    unstructured_mask,
)
from spp_kernels.pruning.calibration import (
    calibration_samples,
    capture_block_inputs,
    run_block,
)
from tests.helpers import make_tiny_llama, make_tiny_mistral, make_tiny_qwen2

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _calib(n=4, seqlen=24, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def _targets(model):
    return [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]


# --- parse_sparsity -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("0.5", 0.5), (0.5, 0.5), ("2:4", (2, 4)), (" 4 : 8 ", (4, 8)), ((2, 8), (2, 8)), (0.3, 0.3)],
)
def test_parse_sparsity_valid(value, expected):
    assert parse_sparsity(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        0.0,
        1.0,
        "0",
        "1",
        -0.1,
        1.5,
        "3:2",
        "4:4",
        "0:4",
        "2:4:8",
        "half",
        "",
        "nan",
        float("inf"),
        (2,),
        (2, 4.0),
    ],
)
def test_parse_sparsity_invalid(value):
    with pytest.raises(ValueError):
        parse_sparsity(value)


@pytest.mark.parametrize("value", [None, True, [2, 4]])
def test_parse_sparsity_wrong_type(value):
    with pytest.raises(TypeError):
        parse_sparsity(value)


# --- masks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, m, rows, cols", [(2, 4, 7, 36), (4, 8, 5, 40), (2, 8, 3, 16), (1, 4, 9, 12)]
)
def test_nm_mask_matches_loop(n, m, rows, cols):
    scores = torch.randn(rows, cols, dtype=torch.float64)
    keep = nm_mask(scores, n, m)
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(0, cols, m):
            order = sorted(range(m), key=lambda j: -float(scores[r, g + j]))
            for j in order[:n]:
                expected[r, g + j] = True
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("sparsity, rows, cols", [(0.5, 6, 30), (0.3, 4, 37), (0.9, 3, 21)])
def test_unstructured_mask_matches_sort(sparsity, rows, cols):
    scores = torch.randn(rows, cols)
    keep = unstructured_mask(scores, sparsity)
    k = round((1 - sparsity) * cols)
    assert (keep.sum(1) == k).all()
    for r in range(rows):
        top = set(torch.argsort(scores[r], descending=True)[:k].tolist())
        assert set(torch.nonzero(keep[r]).flatten().tolist()) == top


def test_mask_errors():
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.randn(2, 10), 2, 4)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_mask(torch.randn(2, 8), 3, 2)
    with pytest.raises(ValueError, match="2-D"):
        unstructured_mask(torch.randn(8), 0.5)
    with pytest.raises(ValueError):
        unstructured_mask(torch.randn(2, 8), 1.0)


# --- calibration ----------------------------------------------------------------------


def test_captured_block_inputs_replay_the_model():
    model = make_tiny_llama(num_hidden_layers=3)
    ids = _calib(3, 20)
    _, layers = find_decoder_layers(model)
    inputs = capture_block_inputs(model, layers, calibration_samples(ids, 3, None, model))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        for j in range(3):
            h = inputs.hidden[j]
            assert torch.equal(h[0], states[0][j])
            for i, layer in enumerate(layers[:-1]):
                h = run_block(layer, h, inputs.extra_args[i], inputs.kwargs[i])
                assert torch.allclose(h[0], states[i + 1][j], atol=1e-6, rtol=0)


def test_calibration_samples_forms():
    model = make_tiny_llama()
    stream = _calib(1, 100)[0]
    out = calibration_samples(stream, 4, 25, model)
    assert torch.equal(out, stream.reshape(4, 25))
    batches = [_calib(2, 30, seed=s) for s in range(3)]
    out = calibration_samples(iter(batches), 5, 16, model)
    assert torch.equal(out, torch.cat(batches)[:5, :16])


# --- Wanda / magnitude against straightforward reimplementations -----------------------


def _reference_sequential(model, ids, score_fn):
    """Prune block after block; a block's inputs come from a full forward of the model
    whose earlier blocks are already pruned (no captured kwargs involved)."""
    _, layers = find_decoder_layers(model)
    masks = {}
    for i, block in enumerate(layers):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}

        def hook(name, sq=sq):
            def f(mod, args, out):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[name] += (x * x).sum(0)

            return f

        handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
        with torch.no_grad():
            for j in range(ids.shape[0]):
                model(ids[j : j + 1])
        for h in handles:
            h.remove()
        for n, lin in linears.items():
            mask = score_fn(lin.weight.detach().double(), sq[n])
            masks[f"{i}.{n}"] = mask
            with torch.no_grad():
                lin.weight.mul_(mask)
    return masks


def _rowwise(scores, sparsity):
    keep = round((1 - sparsity) * scores.shape[1])
    idx = torch.argsort(scores, dim=1, descending=True)[:, :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def _groupwise(scores, n, m):
    rows, cols = scores.shape
    idx = torch.argsort(scores.reshape(rows, -1, m), dim=2, descending=True)[..., :n]
    return (
        torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    )


def _pruned_masks(model):
    _, layers = find_decoder_layers(model)
    return {
        f"{i}.{n}": m.weight != 0
        for i, block in enumerate(layers)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    }


@pytest.mark.parametrize("sparsity", [0.5, "2:4", 0.35])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_masks_match_reference(method, sparsity):
    target = parse_sparsity(sparsity)
    ids = _calib(4, 24)
    model = make_tiny_llama(seed=3)
    ref = copy.deepcopy(model)

    def score_fn(w, sq):
        s = w.abs() * (sq.sqrt() if method == "wanda" else 1.0)
        return _groupwise(s, *target) if isinstance(target, tuple) else _rowwise(s, target)

    expected = _reference_sequential(ref, ids, score_fn)
    prune(model, method, sparsity, calibration=ids, nsamples=4, progress=False)
    got = _pruned_masks(model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# --- exact sparsity, report, other architectures, dtypes --------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4", "4:8", "2:8", 0.7])
def test_exact_sparsity_and_report(method, sparsity):
    model = make_tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    # exact per-row counts; SparseGPT's default block-wise mask is checked below
    report = prune(model, method, sparsity, calibration=_calib(), nsamples=4, progress=False,
                   sparsegpt_mask="row")  # fmt: skip
    target = parse_sparsity(sparsity)
    names = []
    for name, lin in _targets(model):
        names.append(name)
        nonzero = lin.weight != 0
        if isinstance(target, tuple):
            n, m = target
            per_group = nonzero.reshape(lin.out_features, -1, m).sum(-1)
            assert (per_group == n).all(), name
        else:
            assert (nonzero.sum(1) == round((1 - target) * lin.in_features)).all(), name
        if method != "sparsegpt":  # kept weights are untouched
            w0 = before[f"{name}.weight"]
            assert torch.equal(lin.weight[nonzero], w0[nonzero])
    for name, p in model.named_parameters():  # embeddings, norms and lm_head untouched
        if not any(t in name for t in TARGETS):
            assert torch.equal(p, before[name]), name
    again = sparsity_report(model)
    assert again == report
    assert [layer.name for layer in report.layers] == names
    for layer, (_, lin) in zip(report.layers, _targets(model)):
        assert layer.nonzeros == int((lin.weight != 0).sum())
    if isinstance(target, tuple):
        assert report.pattern == target and report.sparsity == pytest.approx(
            1 - target[0] / target[1]
        )
    else:
        assert report.pattern is None


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_block_mask_prunes_the_fraction_per_block(sparsity):
    """The reference mask: one threshold per 128-column block across all rows, so rows may
    keep different counts but each (rows x 128) block loses int(s * numel) + 1 weights."""
    model = make_tiny_llama()
    prune(model, "sparsegpt", sparsity, calibration=_calib(), nsamples=4, progress=False)
    rows_differ = False
    for name, lin in _targets(model):
        zeros = lin.weight == 0
        for start in range(0, lin.in_features, 128):
            block = zeros[:, start : start + 128]
            assert int(block.sum()) == int(sparsity * block.numel()) + 1, name
        rows_differ |= bool((zeros.sum(1) != zeros.sum(1)[0]).any())
    assert rows_differ


def test_report_patterns_and_format():
    model = make_tiny_llama()
    report = sparsity_report(model)
    assert report.sparsity == 0.0 and report.pattern is None
    prune(model, "magnitude", "1:4", progress=False)
    report = sparsity_report(model)
    # 1:4 also satisfies 2:8, 2:4 and 4:8; the tightest (1:4) is reported
    assert report.pattern == (1, 4)
    assert all(
        layer.satisfies == ((1, 4), (2, 8), (3, 8), (2, 4), (4, 8)) for layer in report.layers
    )
    d = report.to_dict()
    assert d["pattern"] == "1:4" and d["sparsity"] == pytest.approx(0.75)
    assert d["layers"][0] == {
        "name": "model.layers.0.self_attn.q_proj",
        "shape": [64, 64],
        "nonzeros": 1024,
        "numel": 4096,
        "sparsity": 0.75,
        "pattern": "1:4",
    }
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "75.00%" in text and "1:4" in text


@pytest.mark.parametrize("factory", [make_tiny_mistral, make_tiny_qwen2])
def test_other_llama_family_models(factory):
    model = factory()
    report = prune(model, "wanda", "2:4", calibration=_calib(2, 24), nsamples=2, progress=False)
    assert report.pattern == (2, 4) and len(report.layers) == 14
    with torch.no_grad():
        assert torch.isfinite(model(_calib(1, 16)).logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_half_precision_models(method, dtype):
    model = make_tiny_llama().to(dtype)
    report = prune(model, method, 0.5, calibration=_calib(), nsamples=4, progress=False,
                   sparsegpt_mask="row")  # fmt: skip
    for _, lin in _targets(model):
        assert lin.weight.dtype == dtype
        assert torch.isfinite(lin.weight).all()
        assert ((lin.weight != 0).sum(1) == lin.in_features // 2).all()
    assert report.sparsity == 0.5


def test_training_mode_restored_and_progress_bar(capsys):
    model = make_tiny_llama().train()
    prune(model, "wanda", 0.5, calibration=_calib(), nsamples=4, progress=True)
    assert model.training
    assert "layer" in capsys.readouterr().err


# --- bad input: clear errors, model untouched --------------------------------------------


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="wanda", sparsity=0), ValueError, "between 0 and 1"),
        (dict(method="wanda", sparsity=1.0), ValueError, "between 0 and 1"),
        (dict(method="wanda", sparsity="3:2"), ValueError, "N < M"),
        (dict(method="magnitude", sparsity="3:7"), ValueError, "in_features=64"),
        (dict(method="sparsegpt", sparsity="2:128"), ValueError, "divide the input dimension"),
        (dict(method="obs", sparsity=0.5), ValueError, "method"),
        (dict(method="wanda", sparsity=0.5, calibration=None), ValueError, "calibration token ids"),
        (
            dict(method="wanda", sparsity=0.5, calibration=torch.rand(4, 24)),
            TypeError,
            "torch.long",
        ),
        (
            dict(
                method="wanda",
                sparsity=0.5,
                calibration=torch.randint(0, 9, (4, 24), dtype=torch.int32),
            ),
            TypeError,
            "torch.long",
        ),
        (dict(method="sparsegpt", sparsity=0.5, nsamples=8), ValueError, "too short"),
        (dict(method="wanda", sparsity=0.5, seqlen=64), ValueError, "fewer than seqlen"),
        (dict(method="wanda", sparsity=0.5, seqlen=512), ValueError, "maximum length"),
        (
            dict(method="wanda", sparsity=0.5, calibration=torch.full((4, 24), 128)),
            ValueError,
            r"\[0, 128\)",
        ),
        (
            dict(
                method="wanda",
                sparsity=0.5,
                calibration=[torch.zeros(4, 24, dtype=torch.long), "x"],
                nsamples=6,
            ),
            TypeError,
            "batch 1",
        ),
    ],
)
def test_bad_input_leaves_model_untouched(kwargs, exc, match):
    model = make_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"calibration": _calib(4, 24), "nsamples": 4, "progress": False, **kwargs}
    with pytest.raises(exc, match=match):
        prune(model, **kwargs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_sparsegpt_nm_needs_m_dividing_blocksize():
    model = make_tiny_llama(hidden_size=48, intermediate_size=96)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="blocksize 128"):
        prune(model, "sparsegpt", "1:3", calibration=_calib(), nsamples=4, progress=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_model_without_decoder_layers():
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        prune(_NoLayers(), "magnitude", 0.5, progress=False)


def test_failure_mid_run_names_pruned_layers(monkeypatch):
    from spp_kernels.pruning import sequential

    model = make_tiny_llama(num_hidden_layers=3)
    calls = {"n": 0}
    real = sequential._pruned_weight

    def failing(*args):
        calls["n"] += 1
        if calls["n"] > 7:  # second block
            raise torch.OutOfMemoryError("simulated")
        return real(*args)

    monkeypatch.setattr(sequential, "_pruned_weight", failing)
    with pytest.raises(RuntimeError, match=r"layers 0..0 are already pruned"):
        prune(model, "wanda", 0.5, calibration=_calib(), nsamples=4, progress=False)
    report = sparsity_report(model)
    assert all(layer.sparsity == 0.5 for layer in report.layers[:7])
    assert all(layer.sparsity == 0.0 for layer in report.layers[7:])  # block 1 all or nothing


# --- hand-off to SPP training ------------------------------------------------------------


def test_pruned_model_trains_with_spp_and_keeps_mask():
    model = make_tiny_llama()
    prune(model, "wanda", "2:4", calibration=_calib(), nsamples=4, progress=False)
    _, layers = find_decoder_layers(model)
    frozen = {}
    for i, block in enumerate(layers):
        for name, lin in list(block.named_modules()):
            if isinstance(lin, nn.Linear):
                parent = block.get_submodule(name.rsplit(".", 1)[0])
                spp = SPPLinear.from_linear(lin, r=4, backend="torch")
                setattr(parent, name.rsplit(".", 1)[1], spp)
                frozen[f"{i}.{name}"] = (spp, lin.weight.detach().clone())
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = [p for spp, _ in frozen.values() for p in (spp.alpha, spp.beta)]
    for p in adapters:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(adapters, lr=1e-2)
    ids = _calib(2, 16, seed=7)
    model.train()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, (spp, w0) in frozen.items():
        assert torch.equal(spp.weight, w0), name
        merged = spp.merged_weight()
        assert torch.equal(merged == 0, w0 == 0), name
        assert not torch.equal(merged, w0), name  # the adapter did train
    assert sparsity_report(model).pattern == (2, 4)
