"""N:M semi-structured sparsity: pattern checks and the packed (values, meta) format.

A weight of shape (rows, cols) is N:M sparse when every group of M consecutive columns
(columns [k*M, (k+1)*M) of a row, k = 0 .. cols/M - 1) holds at most N nonzeros. Such a
weight packs into

* ``values``: (rows, cols // M * N), the weight's dtype. Group k's N kept entries sit at
  columns [k*N, (k+1)*N) in ascending position order.
* ``meta``: int32 (rows, ceil((cols // M) / G)). A position 0..M-1 takes B = log2(M) bits;
  group k's code is sum_j pos_j << (j*B) (N*B bits); G = 32 // (N*B) codes share one word,
  group k at word k // G, bit offset (k % G) * N * B. Words are uint32 bit patterns stored
  as int32, so the top bit may be set (the value then reads negative).

Which N positions are kept: every entry whose value is nonzero (NaN counts as nonzero),
then signed zeros (-0.0: zero value, nonzero bits), then the lowest unused positions, up
to N, sorted ascending. The stored values are the weight's own entries at those positions,
so the round trip ``nm_decompress(*nm_compress(w, n, m), n, m, cols)`` is bit-exact for
every group with at most N entries of nonzero bit pattern, and value-exact (a surplus -0.0
comes back as +0.0) otherwise. Zero is judged by value, not bits, on purpose: pruning by
``weight * mask`` leaves -0.0 wherever a negative weight was cut, and such a weight is
still N:M sparse.

Bytes: 2:4 in fp16 takes cols/2 * 2 value bytes + cols/8 meta bytes per row, 56.25 % of
the dense 2 * cols; 2:8 takes cols/2 + ~cols/10, about 30 %.

Everything here is vectorised PyTorch on the weight's device (CPU or GPU), no Python loop
over rows or groups.
"""

from __future__ import annotations

import functools
import math

import torch

SUPPORTED_M = (4, 8)
PACKABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITS_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

__all__ = [
    "SUPPORTED_M",
    "check_nm",
    "is_nm",
    "nm_compress",
    "nm_decompress",
    "nm_group_counts",
    "nm_meta_shape",
    "nm_packed_nbytes",
    "nm_gather_values",
    "nm_pattern",
    "nm_positions",
]


def _check_nm_args(n: int, m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m not in SUPPORTED_M:
        raise ValueError(f"N:M sparsity: unsupported M={m!r}; supported M: {SUPPORTED_M}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < m:
        raise ValueError(f"N:M sparsity: N must be an integer in [1, M-1={m - 1}], got N={n!r}")


def _check_weight(weight: torch.Tensor, m: int, what: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    if weight.shape[1] % m != 0:
        raise ValueError(
            f"{what} has {weight.shape[1]} columns, not a multiple of M={m}; "
            f"N:M groups of {m} consecutive columns need M to divide cols"
        )


def _label(name: str) -> str:
    return f"{name}: " if name else ""


def _bits_per_position(m: int) -> int:
    return int(math.log2(m))


def _groups_per_word(n: int, m: int) -> int:
    return 32 // (n * _bits_per_position(m))


def nm_meta_shape(rows: int, cols: int, n: int, m: int) -> tuple[int, int]:
    """Shape (rows, ceil((cols // m) / G)) of the int32 metadata of a (rows, cols) weight."""
    _check_nm_args(n, m)
    return rows, -(-(cols // m) // _groups_per_word(n, m))


def nm_packed_nbytes(
    rows: int, cols: int, n: int, m: int, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes of values + meta for a (rows, cols) N:M weight of ``dtype``.

    fp16 fractions of dense: 2:4 56.25 %, 4:8 62.5 % (12-bit codes, two per word), 2:8 30 %,
    1:4 ~28 %.
    """
    if cols % m != 0:
        raise ValueError(f"cols={cols} is not a multiple of M={m}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    meta_rows, meta_words = nm_meta_shape(rows, cols, n, m)
    return rows * (cols // m * n) * itemsize + meta_rows * meta_words * 4


def nm_group_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros (by value; NaN counts) per group of m columns: int32 (rows, cols // m)."""
    _check_weight(weight, m)
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // m, m)
    # m strided passes; a sum over a last dimension of 4 or 8 is several times slower.
    counts = nonzero[..., 0].to(torch.int32)
    for j in range(1, m):
        counts += nonzero[..., j]
    return counts


def check_nm(weight: torch.Tensor, n: int, m: int, name: str = "") -> None:
    """Raise ValueError naming the first (row-major) group with more than n nonzeros.

    ``name`` (a layer or parameter name) prefixes the message.
    """
    _check_nm_args(n, m)
    _check_weight(weight, m, what=f"{_label(name)}weight".strip())
    counts = nm_group_counts(weight, m)
    bad = counts > n
    if bool(bad.any()):
        row, group = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{_label(name)}weight of shape {tuple(weight.shape)} is not {n}:{m} sparse: "
            f"row {row}, group {group} (columns {group * m}..{group * m + m - 1}) has "
            f"{int(counts[row, group])} nonzeros, at most {n} allowed "
            f"({int(bad.sum())} offending groups in all)"
        )


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True iff weight is 2-D, M divides cols and every group of m columns has <= n nonzeros."""
    _check_nm_args(n, m)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] % m:
        return False
    return bool((nm_group_counts(weight, m) <= n).all())


def nm_pattern(weight: torch.Tensor) -> tuple[int, int] | None:
    """The sparsest N:M pattern (M in SUPPORTED_M, N < M) the weight satisfies, or None.

    N is the largest per-group nonzero count (at least 1). Among the M that divide cols the
    lowest ratio N/M wins; on a tie the smaller M (2:4 over 4:8: same density, and the
    pattern sparse tensor cores run).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    best: tuple[int, int] | None = None
    for m in SUPPORTED_M:
        if weight.shape[1] % m or weight.shape[1] == 0:
            continue
        n = max(int(nm_group_counts(weight, m).max()), 1)
        if n < m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


@functools.lru_cache(maxsize=32)
def _selection_table(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions (4**m, n) and group codes (4**m,) for every group "priority key".

    An entry's priority is 3 for a nonzero value, 1 for a signed zero (-0.0: zero value,
    nonzero bits; kept so it survives when there is room), 0 for +0.0; a group's key packs
    its m priorities, 2 bits each. The kept positions are the n highest priorities, the
    lower position first on a tie, listed ascending. Looking the selection up per group
    (rather than sorting every group) keeps nm_compress a few elementwise passes.
    """
    keys = torch.arange(4**m, dtype=torch.int64)
    priority = (keys[:, None] >> (2 * torch.arange(m))) & 3
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    pos = order[:, :n].sort(dim=-1).values
    codes = (pos << (torch.arange(n) * _bits_per_position(m))).sum(dim=-1)
    return pos.to(device), codes.to(device)


def _group_keys(weight: torch.Tensor, m: int) -> torch.Tensor:
    """int32 (rows, cols // m): each group's priority key (see _selection_table)."""
    rows, cols = weight.shape
    bits = weight.reshape(rows, cols // m, m).view(_BITS_VIEW[weight.element_size()])
    sign_bit = torch.iinfo(bits.dtype).min
    # bits != 0: any nonzero pattern (+1); bits without the sign bit != 0: nonzero value (+2).
    priority = (bits != 0).to(torch.uint8) + ((bits & ~sign_bit) != 0).to(torch.uint8) * 2
    # m strided passes; a sum over a last dimension of 4 or 8 is several times slower.
    key = priority[..., 0].to(torch.int32)
    for j in range(1, m):
        key += priority[..., j].to(torch.int32) << (2 * j)
    return key


def nm_compress(
    weight: torch.Tensor, n: int, m: int, *, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an N:M sparse weight (rows, cols) into (values, meta); see the module docstring.

    Returns values (rows, cols // m * n) in weight's dtype and meta int32
    (rows, ceil((cols // m) / G)), both on weight's device. Raises ValueError (naming
    ``name``, the first offending row and group) when the weight is not n:m sparse.
    """
    check_nm(weight, n, m, name=name)
    if weight.dtype not in PACKABLE_DTYPES:
        raise TypeError(
            f"{_label(name)}nm_compress: unsupported dtype {weight.dtype}; supported: "
            + ", ".join(str(d) for d in PACKABLE_DTYPES)
        )
    weight = weight.detach().contiguous()
    rows, cols = weight.shape
    k_groups = cols // m
    table_pos, table_codes = _selection_table(n, m, weight.device)
    keys = _group_keys(weight, m)
    pos = table_pos[keys]  # (rows, k_groups, n)
    values = weight.reshape(rows, k_groups, m).gather(-1, pos).reshape(rows, k_groups * n)

    b = _bits_per_position(m)
    g = _groups_per_word(n, m)
    codes = table_codes[keys]  # (rows, k_groups), n * b bits each
    words = -(-k_groups // g)
    codes = torch.nn.functional.pad(codes, (0, words * g - k_groups))
    word_shifts = torch.arange(g, device=weight.device, dtype=torch.int64) * (n * b)
    packed = (codes.reshape(rows, words, g) << word_shifts).sum(dim=-1)  # in [0, 2**32)
    meta = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return values, meta


def nm_decompress(
    values: torch.Tensor, meta: torch.Tensor, n: int, m: int, cols: int
) -> torch.Tensor:
    """Inverse of nm_compress: the dense (rows, cols) weight in values' dtype and device.

    Raises ValueError on inconsistent shapes or on metadata whose positions are not strictly
    ascending within a group (corrupt or foreign metadata).
    """
    _check_nm_args(n, m)
    for what, t in (("values", values), ("meta", meta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"nm_decompress: {what} must be a torch.Tensor")
        if t.dim() != 2:
            raise ValueError(f"nm_decompress: {what} must be 2-D, got shape {tuple(t.shape)}")
    if meta.dtype != torch.int32:
        raise TypeError(f"nm_decompress: meta must be torch.int32, got {meta.dtype}")
    if isinstance(cols, bool) or not isinstance(cols, int) or cols <= 0 or cols % m:
        raise ValueError(f"nm_decompress: cols must be a positive multiple of M={m}, got {cols!r}")
    rows = values.shape[0]
    k_groups = cols // m
    if values.shape != (rows, k_groups * n):
        raise ValueError(
            f"nm_decompress: values must have shape ({rows}, {k_groups * n}) for cols={cols} "
            f"and {n}:{m}, got {tuple(values.shape)}"
        )
    expected_meta = nm_meta_shape(rows, cols, n, m)
    if tuple(meta.shape) != expected_meta:
        raise ValueError(
            f"nm_decompress: meta must have shape {expected_meta}, got {tuple(meta.shape)}"
        )
    if meta.device != values.device:
        raise ValueError(
            f"nm_decompress: values on {values.device} but meta on {meta.device}; "
            "move both to one device"
        )

    pos = nm_positions(meta, n, m, cols)
    dense = values.new_zeros(rows, k_groups, m)
    dense.scatter_(-1, pos, values.reshape(rows, k_groups, n))
    return dense.reshape(rows, cols)


def nm_positions(meta: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """The kept column positions of every group: int64 (rows, cols // m, n), in [0, m),
    ascending within each group. ValueError for metadata whose positions are not strictly
    ascending (corrupt or foreign metadata)."""
    rows, k_groups = meta.shape[0], cols // m
    b = _bits_per_position(m)
    g = _groups_per_word(n, m)
    words = meta.to(torch.int64) & 0xFFFFFFFF
    word_shifts = torch.arange(g, device=meta.device, dtype=torch.int64) * (n * b)
    codes = (words.unsqueeze(-1) >> word_shifts) & ((1 << (n * b)) - 1)
    codes = codes.reshape(rows, -1)[:, :k_groups]
    shifts = torch.arange(n, device=meta.device, dtype=torch.int64) * b
    pos = (codes.unsqueeze(-1) >> shifts) & (m - 1)  # (rows, k_groups, n)
    if n > 1 and not bool((pos[..., 1:] > pos[..., :-1]).all()):
        raise ValueError(
            "nm_decompress: metadata positions are not strictly ascending within a group; "
            "the meta tensor is corrupt or not in this package's N:M format"
        )
    return pos


def nm_gather_values(dense: torch.Tensor, meta: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Values (rows, cols // m * n) of `dense` (rows, cols) at the kept positions of `meta`:
    repacks a weight with the same zero pattern (e.g. a merged one) under its metadata."""
    rows, cols = dense.shape
    pos = nm_positions(meta, n, m, cols)
    return dense.reshape(rows, cols // m, m).gather(-1, pos).reshape(rows, -1)
