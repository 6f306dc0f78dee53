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


@dataclass(frozen=True)
class BnbWeight:
    """A bitsandbytes layer's quantized weight (`param`: Params4bit or Int8Params), read as
    an (m, n) operand whose rows decode to `dtype`."""

    param: Any
    shape: torch.Size
    dtype: torch.dtype
    kind: str
    row_absmax: Tensor | None = None  # int8: the (m,) absmax per row (SCB)

    @staticmethod
    def check_layer(layer: torch.nn.Module) -> None:
        """ValueError naming the problem unless `layer` is a bitsandbytes Linear4bit (NF4 /
        FP4, quantized) or Linear8bitLt (int8 weights); changes nothing."""
        param = getattr(layer, "weight", None)
        name = type(layer).__name__
        state = getattr(param, "quant_state", None)
        if type(param).__name__ == "Params4bit":
            if state is None or not getattr(param, "bnb_quantized", False):
                raise ValueError(
                    f"SPP: the {name} layer's 4-bit weight is not quantized yet (move the "
                    "model to its device, or load it with a BitsAndBytesConfig, first)"
                )
            if state.quant_type not in ("nf4", "fp4"):
                raise ValueError(f"SPP: unsupported 4-bit quant_type {state.quant_type!r}")
            if len(state.shape) != 2:
                raise ValueError(f"SPP: the {name} layer's weight has shape {tuple(state.shape)}")
        elif type(param).__name__ == "Int8Params":
            if param.dtype != torch.int8 or _row_absmax(layer) is None:
                raise ValueError(
                    f"SPP: the {name} layer keeps float weights (has_fp16_weights=True) or is "
                    "not quantized yet; SPP trains on a frozen int8 base only"
                )
        else:
            raise ValueError(
                f"SPP: unsupported bitsandbytes layer {name} (weight {type(param).__name__}); "
                "SPP takes Linear4bit (NF4/FP4) and Linear8bitLt"
            )

    @classmethod
    def of_layer(cls, layer: torch.nn.Module, dtype: torch.dtype | None = None) -> BnbWeight:
        """The operand of a bitsandbytes Linear4bit / Linear8bitLt (see `check_layer`),
        decoding to `dtype` (default: the 4-bit weight's dtype before quantization, an int8
        layer's bias dtype, else float32). A 4-bit weight that bitsandbytes repacked for
        CPU inference is put back in its standard layout first (`standard_layout`)."""
        cls.check_layer(layer)
        param = layer.weight
        if type(param).__name__ == "Int8Params":
            bias = getattr(layer, "bias", None)
            default = bias.dtype if bias is not None else None
            return cls(param, torch.Size(param.shape), dtype or default or torch.float32,
                       "int8", _row_absmax(layer))  # fmt: skip
        if getattr(param.quant_state, "packing_format_for_cpu", False):
            standard_layout(layer)
            param = layer.weight
        state = param.quant_state
        return cls(param, torch.Size(state.shape), dtype or state.dtype, state.quant_type)

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def requires_grad(self) -> bool:
        return False

    def to(self, dtype: torch.dtype) -> BnbWeight:
        """The same weight decoding to `dtype` (nothing is copied)."""
        return replace(self, dtype=dtype)

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
        # bytes, whatever the storage dtype (bnb_4bit_quant_storage may pack codes in bf16)
        codes = self.param.data.reshape(-1).view(torch.uint8)[e0 // 2 : (e1 + 1) // 2]
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

        inner = state.state2
        size = inner.blocksize
        c0, c1 = b0 // size, math.ceil(b1 / size)
        top = min(c1 * size, state.absmax.numel())
        values = bnbf.dequantize_blockwise(
            state.absmax[c0 * size : top], absmax=inner.absmax[c0:c1], code=inner.code,
            blocksize=size,
        )  # fmt: skip
        values = values[b0 - c0 * size : b1 - c0 * size].float()
        return values + state.offset


def _row_absmax(layer: torch.nn.Module) -> Tensor | None:
    """An int8 layer's (m,) row absmax: on its weight, or (bitsandbytes moves it there at
    the first forward) on the layer's state."""
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else getattr(getattr(layer, "state", None), "SCB", None)


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
