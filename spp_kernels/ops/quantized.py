"""The frozen weight of a bitsandbytes layer as an operand kind: `BnbWeight`.

    W (m, n) = dequant(Q)   Q: NF4 / FP4 codes in blocks of `blocksize` over the flattened
                               weight, one absmax per block (itself 8-bit quantized in
                               blocks of 256 plus an offset when double-quantized);
                               or int8 rows with one absmax per row (LLM.int8()).

A `BnbWeight` never exists dense: `rows(row0, rows)` dequantizes the rows [row0, row0 +
rows) alone (the 4-bit blocks and nested absmax blocks that cover them), so the op's
chunked path (spp_kernels.ops.chunked) keeps its bound of CHUNK_BYTES per transient. The
frozen product X W^T is the base layer's own quantized matmul; the op computes the adapter
term only (with_base=False), on the torch backend, in eager mode (the operand is a Python
object that torch.library cannot carry).

Symmetric quantization maps 0 to 0 (NF4 and FP4 have an exact zero code; int8 rounds 0 to
0), so a pruned weight's zeros stay zero in W and through SPP's merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

Tensor = torch.Tensor
KINDS = ("nf4", "fp4", "int8")
NESTED_BLOCK = 256  # bitsandbytes' block size for the double-quantized absmax


@dataclass(frozen=True)
class BnbWeight:
    """A bitsandbytes layer's quantized weight (`param`: Params4bit or Int8Params), read as
    an (m, n) operand whose rows decode to `dtype`."""

    param: Any
    shape: torch.Size
    dtype: torch.dtype
    kind: str
    row_absmax: Tensor | None = None  # int8: the (m,) absmax per row (SCB)

    @classmethod
    def of_layer(cls, layer: torch.nn.Module, dtype: torch.dtype | None = None) -> BnbWeight:
        """The operand of a bitsandbytes Linear4bit / Linear8bitLt whose weight is
        quantized; ValueError naming the problem otherwise."""
        param = getattr(layer, "weight", None)
        name = type(layer).__name__
        state = getattr(param, "quant_state", None)
        if type(param).__name__ == "Params4bit":
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                standard_layout(layer)
                param, state = layer.weight, layer.weight.quant_state
            if state is None or not getattr(param, "bnb_quantized", False):
                raise ValueError(
                    f"SPP: the {name} layer's 4-bit weight is not quantized yet (move the "
                    "model to its device, or load it with a BitsAndBytesConfig, first)"
                )
            if state.quant_type not in ("nf4", "fp4"):
                raise ValueError(f"SPP: unsupported 4-bit quant_type {state.quant_type!r}")
            shape, kind = torch.Size(state.shape), state.quant_type
            default = state.dtype
        elif type(param).__name__ == "Int8Params":
            # bitsandbytes moves SCB from the weight to the layer's state at the first forward
            scb = getattr(param, "SCB", None)
            scb = scb if scb is not None else getattr(getattr(layer, "state", None), "SCB", None)
            if param.dtype != torch.int8 or scb is None:
                raise ValueError(
                    f"SPP: the {name} layer keeps float weights (has_fp16_weights=True) or is "
                    "not quantized yet; SPP trains on a frozen int8 base only"
                )
            shape, kind = torch.Size(param.shape), "int8"
            default = layer.bias.dtype if getattr(layer, "bias", None) is not None else None
            return cls(param, shape, dtype or default or torch.float32, kind, scb)
        else:
            raise ValueError(
                f"SPP: unsupported bitsandbytes layer {name} (weight {type(param).__name__}); "
                "SPP takes Linear4bit (NF4/FP4) and Linear8bitLt"
            )
        if len(shape) != 2:
            raise ValueError(f"SPP: the {name} layer's weight has shape {tuple(shape)}, not (m, n)")
        return cls(param, shape, dtype or default or torch.float32, kind)

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def requires_grad(self) -> bool:
        return False

    def to(self, dtype: torch.dtype) -> BnbWeight:
        """The same weight decoding to `dtype` (nothing is copied)."""
        return replace(self, dtype=dtype)

    def detach(self) -> BnbWeight:
        return self

    def check(self) -> None:
        """Nothing to check per call: `of_layer` checked the layer once."""

    def rows(self, row0: int, rows: int) -> Tensor:
        """Rows [row0, row0 + rows) of W, dequantized to `dtype`: (rows, n)."""
        m, n = self.shape
        if not (row0 >= 0 and rows >= 0 and row0 + rows <= m):
            raise ValueError(f"BnbWeight.rows: rows [{row0}, {row0 + rows}) outside [0, {m})")
        if self.kind == "int8":
            return self._int8_rows(row0, rows)
        return self._4bit_rows(row0, rows)

    def dense(self) -> Tensor:
        """W (m, n) dequantized (a new tensor: for merging, not for a training step)."""
        return self.rows(0, self.shape[0])

    def _int8_rows(self, row0: int, rows: int) -> Tensor:
        # bitsandbytes' own CPU dequantization (MatMul8bitFp), bit for bit
        scale = self.row_absmax[row0 : row0 + rows].unsqueeze(1).mul(1.0 / 127.0)
        return self.param.data[row0 : row0 + rows].to(self.dtype).mul_(scale)

    def _4bit_rows(self, row0: int, rows: int) -> Tensor:
        import bitsandbytes.functional as bnbf

        state = self.param.quant_state
        n, block = self.shape[1], state.blocksize
        total = self.shape.numel()
        # whole quantization blocks covering the rows' flattened elements [e0, e1)
        e0 = (row0 * n) // block * block
        e1 = min(math.ceil((row0 + rows) * n / block) * block, total)
        b0, b1 = e0 // block, math.ceil(e1 / block)
        codes = self.param.data.view(-1)[e0 // 2 : (e1 + 1) // 2]
        absmax = self._absmax(state, b0, b1)
        part = bnbf.QuantState(absmax=absmax, shape=torch.Size([e1 - e0]), code=state.code,
                               blocksize=block, quant_type=state.quant_type, dtype=self.dtype)  # fmt: skip
        flat = bnbf.dequantize_4bit(codes.reshape(-1, 1), part)
        start = row0 * n - e0
        return flat.view(-1)[start : start + rows * n].view(rows, n)

    @staticmethod
    def _absmax(state: Any, b0: int, b1: int) -> Tensor:
        """The float32 absmax of blocks [b0, b1): a slice, or (double quantization) the
        nested 256-blocks that hold them dequantized, plus the offset."""
        if not state.nested:
            return state.absmax[b0:b1].float()
        import bitsandbytes.functional as bnbf

        c0, c1 = b0 // NESTED_BLOCK, math.ceil(b1 / NESTED_BLOCK)
        top = min(c1 * NESTED_BLOCK, state.absmax.numel())
        inner = state.state2
        values = bnbf.dequantize_blockwise(
            state.absmax[c0 * NESTED_BLOCK : top], absmax=inner.absmax[c0:c1], code=inner.code,
            blocksize=NESTED_BLOCK,
        )  # fmt: skip
        values = values[b0 - c0 * NESTED_BLOCK : b1 - c0 * NESTED_BLOCK].float()
        return values + state.offset


def standard_layout(layer: torch.nn.Module) -> None:
    """Keep a Linear4bit in bitsandbytes' standard layout, which `rows` decodes.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first inference
    call (eval mode, no grad) into a CPU-only tile layout with bfloat16 scales; it converts
    it back itself before saving or moving to a GPU. SPP does the same once (bitsandbytes'
    own inverse) and turns the repacking off for the layer, so that the operand and the
    layer's matmul read one layout (training never repacks; CPU inference of the wrapped
    layer then uses bitsandbytes' portable path)."""
    import bitsandbytes.functional as bnbf

    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
            layer.weight.data, state
        )
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def is_bnb_layer(module: torch.nn.Module) -> bool:
    """Whether `module` is a bitsandbytes linear layer (without importing bitsandbytes:
    a model holding one has imported it)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
