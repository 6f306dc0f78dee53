"""Evaluation: perplexity against a per-window float64 reference, its input checks, and
the lm-eval wrapper's error messages (lm-eval itself is an optional extra, simulated)."""

import math
import sys
import types

import pytest
import torch

from spp_kernels.evaluate import perplexity, zero_shot
from tests.helpers import make_tiny_llama


def _reference_ppl(model, ids, seqlen):
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for k in range(nsamples):
            window = ids[k * seqlen : (k + 1) * seqlen].unsqueeze(0)
            logp = torch.log_softmax(model(window).logits.double(), dim=-1)[0]
            picked = logp[torch.arange(seqlen - 1), window[0, 1:]]
            nlls.append(-picked.mean() * seqlen)
    return math.exp(float(torch.stack(nlls).sum()) / (nsamples * seqlen))


def test_perplexity_matches_reference_and_batching():
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (173,))  # 5 windows of 32 and a dropped tail of 13
    expected = _reference_ppl(model, ids, 32)
    got = perplexity(model, ids, seqlen=32, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids.unsqueeze(0), seqlen=32, batch_size=2, progress=False) == (
        pytest.approx(got, rel=1e-5)
    )
    # a random 128-token model is close to uniform
    assert 60 < got < 300


def test_perplexity_keeps_mode_and_shows_progress(capsys):
    model = make_tiny_llama().train()
    perplexity(model, torch.randint(0, 128, (64,)), seqlen=32)
    assert model.training
    assert "perplexity" in capsys.readouterr().err


def test_perplexity_bf16_model_is_finite():
    model = make_tiny_llama().to(torch.bfloat16)
    ppl = perplexity(model, torch.randint(0, 128, (64,)), seqlen=32, progress=False)
    assert math.isfinite(ppl)


@pytest.mark.parametrize(
    "ids, kwargs, exc, match",
    [
        (torch.randint(0, 128, (600,)), dict(seqlen=512), ValueError, "maximum length 256"),
        (torch.randint(0, 128, (20,)), dict(seqlen=32), ValueError, "fewer than one window"),
        (torch.rand(64), dict(seqlen=32), TypeError, "torch.long"),
        (torch.randint(0, 128, (2, 64)), dict(seqlen=32), ValueError, "1-D"),
        (torch.full((64,), 200), dict(seqlen=32), ValueError, r"\[0, 128\)"),
        (torch.randint(0, 128, (64,)), dict(seqlen=32, batch_size=0), ValueError, "batch_size"),
        (torch.randint(0, 128, (64,)), dict(seqlen=1), ValueError, "at least 2"),
        ([1, 2, 3], dict(seqlen=2), TypeError, "LongTensor"),
    ],
)
def test_perplexity_errors(ids, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        perplexity(make_tiny_llama(), ids, progress=False, **kwargs)


def test_zero_shot_without_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'spp-kernels\[eval\]'"):
        zero_shot(make_tiny_llama(), tokenizer=None, tasks=["piqa"])


def _fake_lm_eval(monkeypatch, simple_evaluate):
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"] = (pretrained, tokenizer, batch_size)

    root = types.ModuleType("lm_eval")
    root.simple_evaluate = lambda **kw: simple_evaluate(calls, **kw)
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", root)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    return calls


def test_zero_shot_passes_the_model_through(monkeypatch):
    def simple_evaluate(calls, **kw):
        calls["evaluate"] = kw
        return {"results": {"piqa": {"acc,none": 0.5}}, "configs": {}}

    calls = _fake_lm_eval(monkeypatch, simple_evaluate)
    model, tok = make_tiny_llama(), object()
    out = zero_shot(model, tok, "piqa", num_fewshot=0, batch_size=4, limit=8)
    assert out == {"piqa": {"acc,none": 0.5}}
    assert calls["hflm"] == (model, tok, 4)
    kw = calls["evaluate"]
    assert kw["tasks"] == ["piqa"] and kw["num_fewshot"] == 0 and kw["limit"] == 8


def test_zero_shot_missing_task_data(monkeypatch):
    def simple_evaluate(calls, **kw):
        raise ConnectionError("Couldn't reach 'ybisk/piqa' on the Hub (LocalEntryNotFoundError)")

    _fake_lm_eval(monkeypatch, simple_evaluate)
    with pytest.raises(RuntimeError, match="could not load the data of tasks"):
        zero_shot(make_tiny_llama(), object(), ["piqa"])


def test_zero_shot_rejects_empty_tasks():
    with pytest.raises(ValueError, match="task names"):
        zero_shot(make_tiny_llama(), object(), [])
