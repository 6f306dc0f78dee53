"""Test configuration: fixtures only (shared helpers are in tests/helpers.py).

On a machine without CUDA the Triton kernels run under the interpreter; TRITON_INTERPRET
must be set before any module defines a @triton.jit kernel, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import HAS_CUDA, make_tiny_llama  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_llama():
    """Factory fixture: tiny_llama(seed=0, **config_overrides) -> LlamaForCausalLM."""
    return make_tiny_llama
