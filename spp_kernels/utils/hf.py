"""Hugging Face model helpers shared by pruning, evaluation and training: where a causal
LM keeps its decoder blocks, which device its token ids go to, its maximum length."""

from __future__ import annotations

import torch
from torch import nn

# Where Hugging Face causal LMs keep their decoder blocks (LLaMA/Mistral/Qwen2/Gemma/Phi,
# OPT, GPT-2/Falcon/BLOOM, GPT-NeoX, multimodal language towers).
DECODER_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.blocks",
    "gpt_neox.layers",
    "layers",
)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (path, decoder blocks) of a causal LM, or raise ValueError.

    Looks at the usual attribute paths first, then at any nn.ModuleList whose length is
    the config's num_hidden_layers.
    """
    for path in DECODER_LAYER_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if num_layers:
        for path, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == num_layers:
                return path, module
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: pruning supports "
        "LLaMA-family decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) and "
        f"models with an nn.ModuleList of blocks at one of {', '.join(DECODER_LAYER_PATHS)}"
    )


def max_positions(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config, or None when it has none."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def input_device(model: nn.Module) -> torch.device:
    """The device token ids must be on: the input embedding's, else the first parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Module):
        for p in emb.parameters():
            return p.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_finite(tensor: torch.Tensor, name: str, what: str, suffix: str = "") -> None:
    """ValueError "`what`: `name` holds N non-finite values (NaN/inf)`suffix`" when a
    floating tensor (not on the meta device) holds any."""
    if tensor.is_floating_point() and tensor.device.type != "meta":
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            raise ValueError(f"{what}: {name} holds {bad} non-finite values (NaN/inf){suffix}")


def check_finite_parameters(model: nn.Module, what: str, names: list[str] | None = None,
                            outcome: str = "nothing was changed") -> None:  # fmt: skip
    """ValueError naming the first parameter or buffer (of `names`, default all floating
    ones) holding non-finite values, with their count: `what` says who refuses, `outcome`
    what it did not do."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in names if names is not None else list(tensors):
        if name in tensors:
            check_finite(tensors[name], name, what, f"; {outcome}")
