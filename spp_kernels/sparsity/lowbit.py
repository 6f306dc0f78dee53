"""Low-bit values inside the packed N:M format: `QuantizedPackedWeight` and its frozen layer.

The N:M packed format (spp_kernels.sparsity.nm) keeps values (m, K), K = n // M * N, and
int32 metadata. Here the kept values are stored as low-bit codes with scales, quantized
round-to-nearest and symmetric (no zero point), so a pruned zero is not stored at all and
a kept value decodes to code * scale:

    "int8"  codes int8 (m, K) in [-127, 127]; scales float32 (m,), absmax(row) / 127
    "fp8"   codes float8_e4m3fn (m, K), stored as their uint8 bit patterns;
            scales float32 (m,), absmax(row) / 448 (e4m3's largest finite value)
    "int4"  codes (m, K) in [-7, 7], two per uint8 byte (even index in the low nibble,
            two's complement); scales bfloat16 (m, K // group_size), absmax / 7 over each
            group of `group_size` consecutive kept values (default 128). K must be a
            multiple of group_size, and group_size of N (a group never splits an N:M group)

Decoding is exact and the same everywhere: float32(code) * float32(scale), rounded once to
the compute dtype (the host chunk decoder `rows`, and csrc_triton/nm_tiles.py's tile
decoder in registers). Pruned positions decode to +0.0; a kept value may round to 0
(the pattern stays N:M valid). This is plain round-to-nearest: GPTQ-style quantization
would choose codes to compensate each rounding error with the columns not yet quantized
(using calibration activations), which typically recovers most of int4's perplexity loss;
it is not done here.

Bytes per kept value: int8 / fp8 1 (+ 4 per row), int4 0.5 (+ 2 per group): a 2:4 weight
in int4 takes about 19 % of its dense bf16 bytes, metadata included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .nm import nm_compress, nm_decompress
from .packed import PackedWeight, check_packed

Tensor = torch.Tensor

VALUE_FORMATS = ("int8", "int4", "fp8")
DEFAULT_GROUP_SIZE = 128
# transformers' quant_method of a `spp quantize` checkpoint (= lowbit_hf.QUANT_METHOD, which
# does not import this module: it runs while transformers itself is being imported)
QUANT_METHOD = "spp_nm_lowbit"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": FP8_MAX}


def check_value_format(
    value_format: str, group_size: int, n_keep: int, kept: int, name: str = ""
) -> None:
    """ValueError (prefixed by `name`) unless `value_format` can store rows of `kept` packed
    values of an N:M pattern with N = n_keep (int4: group_size divides kept, N divides it)."""
    where = f"{name}: " if name else ""
    if value_format not in VALUE_FORMATS:
        raise ValueError(
            f"{where}weight_dtype must be one of {VALUE_FORMATS}, got {value_format!r}"
        )
    if value_format != "int4":
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{where}int4 group_size must be a positive int, got {group_size!r}")
    if group_size % n_keep:
        raise ValueError(f"{where}int4 group_size={group_size} must be a multiple of N={n_keep}")
    if kept % group_size:
        raise ValueError(
            f"{where}int4 needs a row length divisible by the group: {kept} kept values per "
            f"row is not a multiple of group_size={group_size} (choose a group size dividing "
            f"{kept})"
        )


def quantize_values(
    values: Tensor, value_format: str, group_size: int = DEFAULT_GROUP_SIZE
) -> tuple[Tensor, Tensor]:
    """(codes, scales) of packed values (m, K), round-to-nearest, symmetric (module
    docstring). ValueError for non-finite values."""
    v = values.detach().to(torch.float32)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("quantize: the weight has non-finite values; nothing was quantized")
    m, kept = v.shape
    qmax = _QMAX[value_format]
    if value_format == "int4":
        v = v.reshape(m, kept // group_size, group_size)
        absmax = v.abs().amax(-1)
        scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        scales = scales.to(torch.bfloat16)  # the stored scale is the one codes are made with
        q = torch.round(v / scales.float()[..., None]).clamp_(-qmax, qmax).to(torch.int8)
        q = (q.reshape(m, kept // 2, 2) & 0xF).to(torch.uint8)
        return q[..., 0] | (q[..., 1] << 4), scales
    absmax = v.abs().amax(-1)
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    scaled = v / scales[:, None]
    if value_format == "int8":
        return torch.round(scaled).clamp_(-qmax, qmax).to(torch.int8), scales
    return scaled.clamp_(-qmax, qmax).to(torch.float8_e4m3fn).view(torch.uint8), scales


def dequantize_values(
    codes: Tensor, scales: Tensor, value_format: str, group_size: int, dtype: torch.dtype
) -> Tensor:
    """The values (rows, K) in `dtype`: float32(code) * float32(scale), rounded once."""
    if value_format == "int4":
        low = (codes & 0xF).to(torch.int8)
        high = (codes >> 4).to(torch.int8)
        q = torch.stack((low, high), -1).reshape(codes.shape[0], -1)
        q = torch.where(q >= 8, q - 16, q).to(torch.float32)
        rows, kept = q.shape
        per_group = scales.to(torch.float32)[..., None]
        return (
            (q.reshape(rows, kept // group_size, group_size) * per_group)
            .reshape(rows, kept)
            .to(dtype)
        )
    if value_format == "int8":
        q = codes.to(torch.float32)
    else:
        q = codes.view(torch.float8_e4m3fn).to(torch.float32)
    return (q * scales.to(torch.float32)[:, None]).to(dtype)


@dataclass(frozen=True)
class QuantizedPackedWeight:
    """A frozen N:M sparse weight (m, n) whose kept values are int8 / int4 / fp8 codes
    (module docstring): a kind of the op's frozen-weight operand.

    Attributes:
        codes: int8 (m, K) | uint8 fp8 bit patterns (m, K) | uint8 int4 pairs (m, K // 2),
            K = in_features // group * n_keep.
        scales: float32 (m,) (int8, fp8) | bfloat16 (m, K // group_size) (int4).
        meta: int32 N:M metadata (spp_kernels.sparsity.nm).
        n_keep, group, in_features: as PackedWeight's.
        value_format: "int8", "int4" or "fp8".  group_size: int4's scale group (else 0).
        dtype: the compute dtype W decodes to (the activations' dtype).
    Tensor-like: `shape` (m, n), `dtype`, `device`.
    """

    codes: Tensor
    scales: Tensor
    meta: Tensor
    n_keep: int
    group: int
    in_features: int
    value_format: str
    group_size: int
    dtype: torch.dtype

    @classmethod
    def from_packed(
        cls,
        packed: PackedWeight,
        value_format: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        name: str = "",
    ) -> QuantizedPackedWeight:
        """Quantize a PackedWeight's values (its dtype becomes the compute dtype)."""
        kept = packed.values.shape[1]
        check_value_format(value_format, group_size, packed.n_keep, kept, name)
        group_size = group_size if value_format == "int4" else 0
        codes, scales = quantize_values(packed.values, value_format, group_size)
        return cls(codes, scales, packed.meta, packed.n_keep, packed.group, packed.in_features,
                   value_format, group_size, packed.dtype)  # fmt: skip

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        n_keep: int,
        group: int,
        value_format: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        name: str = "",
    ) -> QuantizedPackedWeight:
        """Pack an N:M sparse (m, n) weight and quantize its kept values; ValueError naming
        the first bad group, a bad format or a row length the int4 group does not divide,
        before anything is made."""
        check_value_format(value_format, group_size, n_keep, weight.shape[-1] // group * n_keep,
                      name)  # fmt: skip
        values, meta = nm_compress(weight, n_keep, group, name=name)
        packed = PackedWeight(values, meta, n_keep, group, weight.shape[1])
        return cls.from_packed(packed, value_format, group_size, name=name)

    # ---- tensor-like ------------------------------------------------------------------

    @property
    def nm(self) -> tuple[int, int]:
        return self.n_keep, self.group

    @property
    def kept(self) -> int:
        """K: kept values per row."""
        return self.in_features // self.group * self.n_keep

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.in_features

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales + meta."""
        return self.codes.nbytes + self.scales.nbytes + self.meta.nbytes

    @property
    def values(self) -> Tensor:
        """The codes as the kernels read them (int8, or uint8 bytes)."""
        return self.codes

    def check(self) -> QuantizedPackedWeight:
        """Validate codes, scales and meta against the format; returns self."""
        check_value_format(self.value_format, self.group_size, self.n_keep, self.kept, "")
        m, kept = self.codes.shape[0], self.kept
        code_dtype = torch.int8 if self.value_format == "int8" else torch.uint8
        code_cols = kept // 2 if self.value_format == "int4" else kept
        if self.codes.dtype != code_dtype or tuple(self.codes.shape) != (m, code_cols):
            raise ValueError(
                f"quantized packed weight: {self.value_format} codes must be {code_dtype} "
                f"(m, {code_cols}), got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        if self.value_format == "int4":
            scale_dtype, scale_shape = torch.bfloat16, (m, kept // self.group_size)
        else:
            scale_dtype, scale_shape = torch.float32, (m,)
        if self.scales.dtype != scale_dtype or tuple(self.scales.shape) != scale_shape:
            raise ValueError(
                f"quantized packed weight: {self.value_format} scales must be {scale_dtype} "
                f"{scale_shape}, got {self.scales.dtype} {tuple(self.scales.shape)}"
            )
        # meta (and the N:M pattern) as a PackedWeight's, on a zero-stride stand-in for values
        stand_in = self.meta.new_empty((), dtype=torch.float32).expand(m, kept)
        check_packed(stand_in, self.meta, self.n_keep, self.group, self.in_features)
        if len({self.codes.device, self.scales.device, self.meta.device}) != 1:
            raise ValueError("quantized packed weight: codes, scales and meta on one device")
        if not self.dtype.is_floating_point:
            raise TypeError(f"quantized packed weight: compute dtype {self.dtype} is not float")
        return self

    # ---- decoding ---------------------------------------------------------------------

    def kept_values(self, row0: int, rows: int) -> Tensor:
        """Decoded packed values of rows [row0, row0 + rows): (rows, K) in `dtype`."""
        sl = slice(row0, row0 + rows)
        return dequantize_values(self.codes[sl], self.scales[sl], self.value_format,
                                 self.group_size, self.dtype)  # fmt: skip

    def rows(self, row0: int, rows: int) -> Tensor:
        """Dense rows [row0, row0 + rows) of W (rows, n) in `dtype`: the host chunk decoder."""
        return nm_decompress(self.kept_values(row0, rows), self.meta[row0 : row0 + rows],
                             self.n_keep, self.group, self.in_features)  # fmt: skip

    def dense(self) -> Tensor:
        """The dense (m, n) weight, decoded (a new tensor)."""
        return self.rows(0, self.shape[0])

    def to(self, *args, **kwargs) -> QuantizedPackedWeight:
        """Like Tensor.to: a dtype sets the compute dtype (the codes never change), a device
        moves codes, scales and meta."""
        probe = torch.empty((), dtype=self.dtype, device=self.device).to(*args, **kwargs)
        move = lambda t: t.to(probe.device)  # noqa: E731
        return QuantizedPackedWeight(
            move(self.codes), move(self.scales), move(self.meta), self.n_keep, self.group,
            self.in_features, self.value_format, self.group_size, probe.dtype,
        )  # fmt: skip


class QuantizedPackedLinear(torch.nn.Module):
    """A frozen linear layer whose N:M sparse weight keeps low-bit values: the base layer an
    SPP adapter wraps with SPPConfig(weight_format="nm", weight_dtype=...).

    Buffers `weight_codes`, `weight_scales`, `weight_meta` (module docstring), optional
    frozen `bias`; `weight` is None. The compute dtype (`compute_dtype`, what W decodes to)
    follows the model's casts (`model.to(torch.bfloat16)`) while codes and scales never
    change: casting a model does not touch them. Its own forward (adapters disabled)
    decodes W per call.
    """

    def __init__(
        self, weight: QuantizedPackedWeight, bias: Tensor | None = None, *, check: bool = True
    ) -> None:
        super().__init__()
        if check:
            weight.check()
        self.in_features, self.out_features = weight.in_features, weight.shape[0]
        self.n_keep, self.group = weight.n_keep, weight.group
        self.value_format, self.group_size = weight.value_format, weight.group_size
        self.compute_dtype = weight.dtype
        self.register_buffer("weight_codes", weight.codes)
        self.register_buffer("weight_scales", weight.scales)
        self.register_buffer("weight_meta", weight.meta)
        self.weight = None
        self._parameters["bias"] = (
            None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        )

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Module,
        n_keep: int,
        group: int,
        value_format: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        name: str = "",
    ) -> QuantizedPackedLinear:
        """Quantize an nn.Linear's (or a PackedLinear's) N:M weight; ValueError before
        anything is made when the weight or the format does not fit."""
        if hasattr(linear, "packed_weight"):
            packed = linear.packed_weight()
            if packed.nm != (n_keep, group):
                raise ValueError(
                    f"{name or 'QuantizedPackedLinear'}: the packed layer is "
                    f"{packed.n_keep}:{packed.group}, not {n_keep}:{group}"
                )
            weight = QuantizedPackedWeight.from_packed(packed, value_format, group_size,
                                                       name=name)  # fmt: skip
        else:
            weight = QuantizedPackedWeight.from_dense(
                linear.weight.detach(), n_keep, group, value_format, group_size, name=name
            )
        return cls(weight, linear.bias)

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, bias: bool, n_keep: int, group: int,
        value_format: str, group_size: int = DEFAULT_GROUP_SIZE, *,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "meta",
    ) -> QuantizedPackedLinear:  # fmt: skip
        """A layer of these shapes and dtypes with uninitialised buffers: on the meta device
        (the default), the empty layer a checkpoint loads into (spp_kernels.sparsity.lowbit_hf)."""
        weight = _empty_weight(out_features, in_features, n_keep, group, value_format,
                               group_size, dtype, device)  # fmt: skip
        bias_t = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        return cls(weight, bias_t, check=False)

    @property
    def nm(self) -> tuple[int, int]:
        return self.n_keep, self.group

    def quantized_weight(self, dtype: torch.dtype | None = None) -> QuantizedPackedWeight:
        """The frozen weight as the op's operand (views of the buffers; not re-checked),
        decoding to `dtype` (default: `compute_dtype`)."""
        return QuantizedPackedWeight(
            self.weight_codes, self.weight_scales, self.weight_meta, self.n_keep, self.group,
            self.in_features, self.value_format, self.group_size, dtype or self.compute_dtype,
        )  # fmt: skip

    def dense_weight(self) -> Tensor:
        """The dense (m, n) weight, decoded (a new tensor)."""
        return self.quantized_weight().dense()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's hook
        # Module casts (.to(dtype), .half(), .bfloat16()) convert floating tensors only: the
        # float scales go through as integer views, so only their device moves; a float
        # probe carries the cast over to the compute dtype.
        probe = fn(torch.empty((), dtype=self.compute_dtype, device=self.weight_meta.device))
        scales = self._buffers["weight_scales"]
        bits = torch.int16 if scales.element_size() == 2 else torch.int32
        self._buffers["weight_scales"] = scales.view(bits)
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_scales"] = self._buffers["weight_scales"].view(scales.dtype)
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.quantized_weight(x.dtype).dense(), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.value_format == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nm={self.n_keep}:{self.group}, "
            f"weight_dtype={self.value_format}{group}"
        )


def _empty_weight(
    m: int, n: int, n_keep: int, group: int, value_format: str, group_size: int,
    dtype: torch.dtype, device: torch.device | str,
) -> QuantizedPackedWeight:  # fmt: skip
    """A QuantizedPackedWeight of the right shapes and dtypes with uninitialised storage
    (for loading: on the meta device, nothing is allocated)."""
    from .nm import nm_meta_shape

    kept = n // group * n_keep
    check_value_format(value_format, group_size, n_keep, kept)
    if value_format == "int4":
        codes = torch.empty(m, kept // 2, dtype=torch.uint8, device=device)
        scales = torch.empty(m, kept // group_size, dtype=torch.bfloat16, device=device)
    else:
        code_dtype = torch.int8 if value_format == "int8" else torch.uint8
        codes = torch.empty(m, kept, dtype=code_dtype, device=device)
        scales = torch.empty(m, dtype=torch.float32, device=device)
    meta = torch.empty(nm_meta_shape(m, n, n_keep, group), dtype=torch.int32, device=device)
    group_size = group_size if value_format == "int4" else 0
    return QuantizedPackedWeight(codes, scales, meta, n_keep, group, n, value_format, group_size,
                                 dtype)  # fmt: skip


def stored_value_format(config: Any) -> str | None:
    """The value format ("int8", "fp8", "int4") a model config names when it is a `spp
    quantize` checkpoint's (a transformers config, or config.json read as a dict), else
    None."""
    if isinstance(config, dict):
        quantization = config.get("quantization_config")
    else:
        quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        method, value_format = quantization.get("quant_method"), quantization.get("weight_dtype")
    else:
        method = getattr(quantization, "quant_method", None)
        value_format = getattr(quantization, "weight_dtype", None)
    return value_format if method == QUANT_METHOD else None


def quantize_model(
    model: torch.nn.Module,
    value_format: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    modules: list[str] | None = None,
) -> dict[str, list[int]]:
    """Replace N:M sparse nn.Linear layers of `model` by QuantizedPackedLinear layers, in
    place: `modules` (names; each must be N:M), or every nn.Linear whose weight is N:M for
    some M in (4, 8) (a dense lm_head stays as it is). Every layer is checked first (its
    pattern, the int4 group against its packed row, finite weights): a ValueError names
    each offender before any layer changes. Returns {name: [N, M]} of the replaced layers.
    """
    from .nm import nm_pattern
    from .semi_structured import _refuse_unmerged, _selected_linears

    what = "quantize_model"
    _refuse_unmerged(model, what)
    linears = _selected_linears(model, modules, what)
    plan, offenders = {}, []
    for name, linear in linears.items():
        w = linear.weight.detach()
        pattern = nm_pattern(w)
        if pattern is None:
            if modules is not None:
                offenders.append(f"{name}: not N:M sparse for any M in (4, 8)")
            continue
        try:
            check_value_format(value_format, group_size, pattern[0],
                               w.shape[1] // pattern[1] * pattern[0], name)  # fmt: skip
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"{name}: the weight has non-finite values")
        except ValueError as e:
            offenders.append(str(e))
            continue
        plan[name] = list(pattern)
    if offenders:
        raise ValueError(
            f"{what}: {len(offenders)} layer(s) cannot be quantized, nothing changed; first: "
            f"{offenders[0]}\n  " + "\n  ".join(offenders)
        )
    if not plan:
        raise ValueError(f"{what}: no N:M sparse nn.Linear layer in the model; prune it first")
    for name, (n_keep, group) in plan.items():
        linear = model.get_submodule(name)
        layer = QuantizedPackedLinear.from_linear(linear, n_keep, group, value_format, group_size,
                                                  name=name).train(linear.training)  # fmt: skip
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return plan
