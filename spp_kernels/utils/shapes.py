"""LLaMA-family reference shapes as LlamaConfig keyword arguments: the one definition the
benchmarks, the memory estimate and the tests share (numbers from the models' config.json)."""

from __future__ import annotations

from typing import Any

_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads")  # fmt: skip


def _config(*values: int) -> dict[str, Any]:
    return dict(zip(_KEYS, values))


LLAMA_7B = _config(32000, 4096, 11008, 32, 32, 32)
LLAMA_13B = _config(32000, 5120, 13824, 40, 40, 40)
LLAMA_2_70B = _config(32000, 8192, 28672, 80, 64, 8)
TINYLLAMA_1B = _config(32000, 2048, 5632, 22, 32, 4)
SMOLLM2_135M = _config(49152, 576, 1536, 30, 9, 3)  # the embedded demo model
TINY = _config(128, 64, 96, 2, 4, 2)  # the tiny random model of the tests and quick benchmarks
