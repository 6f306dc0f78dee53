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


def test_perplexity_accumulates_like_float64_on_a_large_vocabulary():
    """The cross-entropy runs on (tokens, vocab) rows: on the (batch, vocab, seq) layout
    float32 on CPU read about 2e-5 nats per token low here (1.5e-4 on SmolLM2)."""
    model = make_tiny_llama(vocab_size=16384)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # confident logits, as a trained model has
    ids = torch.randint(0, 16384, (4 * 128,), generator=torch.Generator().manual_seed(0))
    expected = _reference_ppl(model, ids, 128)
    got = perplexity(model, ids, seqlen=128, batch_size=4, progress=False)
    assert abs(math.log(got) - math.log(expected)) < 6e-6


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
    tasks = types.ModuleType("lm_eval.tasks")

    class TaskManager:
        def __init__(self, include_path, include_defaults):
            calls["task_manager"] = (include_path, include_defaults)

    tasks.TaskManager = TaskManager
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
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
    include_path, include_defaults = calls["task_manager"]
    assert include_path.endswith("lmeval_tasks") and include_defaults is True
    zero_shot(model, tok, ["wiki_title_mc"])
    assert calls["task_manager"][1] is False  # the built-in index is not built for local tasks


def test_zero_shot_missing_task_data(monkeypatch):
    def simple_evaluate(calls, **kw):
        raise ConnectionError("Couldn't reach 'ybisk/piqa' on the Hub (LocalEntryNotFoundError)")

    _fake_lm_eval(monkeypatch, simple_evaluate)
    with pytest.raises(RuntimeError, match="could not load the data of tasks"):
        zero_shot(make_tiny_llama(), object(), ["piqa"])


def test_zero_shot_rejects_empty_tasks():
    with pytest.raises(ValueError, match="task names"):
        zero_shot(make_tiny_llama(), object(), [])


def _hand_loglik(tokenizer, model, context, continuation):
    """lm-eval's causal log-likelihood of `continuation` after `context`, by hand: trailing
    context whitespace moves to the continuation, the continuation's tokens are the tail of
    encode(context + continuation) after encode(context)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context)
    cont = tokenizer.encode(context + continuation)[len(ctx) :]
    with torch.no_grad():
        logits = model(torch.tensor([(ctx + cont)[:-1]])).logits.double()
    logp = torch.log_softmax(logits, -1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_wiki_title_mc_runs_in_lm_eval_and_matches_a_hand_computation(tmp_path, monkeypatch):
    """A real lm-eval run (offline, local task files) on a tiny model: its accuracy equals
    the argmax of the summed log-likelihoods of " " + choice, computed here."""
    import datasets

    from spp_kernels.datasets import wiki_title_mc_docs
    from tests.helpers import tiny_tokenizer

    monkeypatch.setenv("SPP_CACHE_DIR", str(tmp_path / "spp"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    model, tokenizer = make_tiny_llama(seed=3), tiny_tokenizer()
    limit = 6
    results = zero_shot(model, tokenizer, ["wiki_title_mc"], limit=limit, batch_size=2,
                        random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # fmt: skip
    got = results["wiki_title_mc"]
    hits = []
    for doc in wiki_title_mc_docs(limit):
        context = f"{doc['text']}\nThe blank is:"
        lls = [_hand_loglik(tokenizer, model, context, " " + c) for c in doc["choices"]]
        hits.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
    assert got["acc,none"] == pytest.approx(sum(hits) / limit)
    assert (tmp_path / "spp").is_dir()  # the task's JSON Lines file lives in the cache dir


def test_fit_and_validation_partition_the_train_articles():
    """Issue 23: learning rates are chosen on `validation`, runs train on `fit`; both are
    train articles (by title hash), disjoint, and share nothing with held-out."""
    from spp_kernels.datasets import wikipedia_articles

    titles = {s: {a["title"] for a in wikipedia_articles(s)}
              for s in ("train", "fit", "validation", "heldout")}  # fmt: skip
    assert titles["fit"] | titles["validation"] == titles["train"]
    assert not titles["fit"] & titles["validation"]
    assert not titles["validation"] & titles["heldout"]
    assert 0.08 < len(titles["validation"]) / len(titles["train"]) < 0.17
