"""Shared test helpers: device flags, the per-dtype tolerance table, normwise errors and
tiny LLaMA-family models (random init, no download). Import as `from tests.helpers import ...`;
fixtures live in conftest.py."""

from __future__ import annotations

import json
import math

import torch

from spp_kernels.utils import shapes

HAS_CUDA = torch.cuda.is_available()
# The Triton interpreter (3.6) turns 0-d arrays into loop bounds with a numpy deprecation.
INTERPRETER_WARNINGS = "ignore:Conversion of an array with ndim:DeprecationWarning"


def require_triton_kernels() -> None:
    """Skip the calling test module unless the Triton kernels can run: triton installed,
    and a CUDA GPU or the interpreter (TRITON_INTERPRET=1, set by conftest without CUDA)."""
    import os

    import pytest

    pytest.importorskip("triton")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


DEVICE = "cuda" if HAS_CUDA else "cpu"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Normwise tolerance, max|got - ref| / max|ref| against a float64 oracle, by the dtype of
# the compared tensor. fp32 uses IEEE products (no TF32), so it is exact up to summation
# order; fp16/bf16 carry the rounding of the inputs, of W_eff (or W * alpha) and of the
# output; the interpreter's float32 -> bf16 conversion truncates (up to two bf16 ulps).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def normwise_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref| in float64 (0-safe)."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close(got: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype | None = None,
                 tol: float | None = None, name: str = "output") -> float:  # fmt: skip
    """Every numerical test's check against a (float64) reference: same shape, all finite
    (a poisoned, unwritten output fails), normwise error <= `tol` (default TOL of `dtype`,
    the precision the result was computed in, or else got's dtype). Returns the error."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    limit = TOL[dtype or got.dtype] if tol is None else tol
    err = normwise_error(got, ref)
    assert err <= limit, f"{name} ({dtype or got.dtype}): error {err:.3e} > {limit:.1e}"
    return err


def train_adapters(layer, in_features: int, steps: int, tokens: int = 8) -> None:
    """`steps` AdamW steps (lr 1e-2) of a standalone SPP layer's alpha and beta on random
    inputs (tokens, in_features), loss mean(y^2)."""
    opt = torch.optim.AdamW([layer.alpha, layer.beta], lr=1e-2, weight_decay=0.01)
    for _ in range(steps):
        loss = layer(torch.randn(tokens, in_features)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


_TINY = dict(shapes.TINY, max_position_embeddings=256)


def make_tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM small enough for CPU tests, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(**{**_TINY, "tie_word_embeddings": False, **overrides})
    ).eval()


def make_tiny_mistral(seed: int = 0, **overrides):
    """A tiny MistralForCausalLM (sliding window 8, so its layers see a windowed mask)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**{**_TINY, "sliding_window": 8, **overrides})).eval()


def make_tiny_qwen2(seed: int = 0, **overrides):
    """A tiny Qwen2ForCausalLM (biased q/k/v projections)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**_TINY, **overrides})).eval()


CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'#-()\n"


def tiny_tokenizer():
    """A character-level fast tokenizer built offline (ids < 100), with BOS/EOS/PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(CHARS)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ALPACA = [
    {"instruction": "Say hi.", "input": "", "output": "hi there."},
    {"instruction": "Add.", "input": "2 and 3", "output": "5."},
    {"instruction": "Name a color.", "output": "blue."},
]


# ---- the `spp` command, called in-process ---------------------------------------------

CLI_TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def cli_run(capsys, *argv):
    """(exit status, stdout, stderr) of spp_kernels.cli.main(argv)."""
    from spp_kernels.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv):
    """The JSON result of a successful `spp ... --json --quiet`."""
    code, out, err = cli_run(capsys, *argv, "--json", "--quiet")
    assert code == 0, err
    return json.loads(out)


def assert_user_error(capsys, pattern, *argv):
    """Exit 1 with exactly one `spp ...: error:` line containing `pattern`, no traceback."""
    code, out, err = cli_run(capsys, *argv, "--quiet")
    assert code == 1, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("spp ")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    return lines[0]


def make_cli_models(root, adapter: bool = False):
    """root/dense (tiny LLaMA + tokenizer), root/pruned (2:4 magnitude), data files
    root/alpaca.jsonl and root/text.txt, and with `adapter` root/adapter (2 steps of
    `spp train`, r = 4, on root/text.txt); returns root."""
    from spp_kernels.cli import main

    dense = root / "dense"
    make_tiny_llama(seed=0).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    write_jsonl(root / "alpaca.jsonl", ALPACA * 4)
    (root / "text.txt").write_text(CLI_TEXT)
    assert main(["prune", "--model", str(dense), "--method", "magnitude", "--sparsity", "2:4",
                 "--out", str(root / "pruned"), "--quiet"]) == 0  # fmt: skip
    if adapter:
        assert main(["train", "--model", str(root / "pruned"), "--data", str(root / "text.txt"),
                     "--out", str(root / "adapter"), "--max-steps", "2", "--spp-r", "4",
                     "--max-len", "32", "--quiet"]) == 0  # fmt: skip
    return root


class NaNEmptyTorch:
    """Stands in for the `torch` module inside the kernel launchers and the chunked path: torch.empty returns
    NaN-filled (or -1 for integers) tensors, so unwritten output elements are caught."""

    def __init__(self):
        self.poisoned = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *size, dtype=None, device=None, **kwargs):
        self.poisoned += 1
        t = torch.empty(*size, dtype=dtype, device=device, **kwargs)
        return t.fill_(math.nan if t.is_floating_point() else -1)


def cpu_allocations(fn) -> list[tuple[str, int]]:
    """(operator, bytes) of every CPU allocation the profiler records while fn() runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage > 0]


def assert_allocations_bounded(step, limit: int, probe, probe_bytes: int) -> None:
    """No allocation of `step()` exceeds `limit` bytes, and the same profiler does see
    `probe()` allocate at least `probe_bytes` (the whole weight it must never make)."""
    sizes = cpu_allocations(step)
    assert sizes, "the probe recorded nothing"
    too_big = [(name, size) for name, size in sizes if size > limit]
    assert not too_big, f"allocations over {limit} bytes: {too_big}"
    assert max(size for _, size in cpu_allocations(probe)) >= probe_bytes
