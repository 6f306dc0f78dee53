"""Test configuration.

On a machine without CUDA the Triton kernels run under the interpreter; TRITON_INTERPRET
must be set before any module defines a @triton.jit kernel, so it is set here, first.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = _HAS_CUDA


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def make_tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM small enough for CPU tests (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


@pytest.fixture
def tiny_llama():
    """Factory fixture: tiny_llama(seed=0, **config_overrides) -> LlamaForCausalLM."""
    return make_tiny_llama
