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


def _check_nm_args(n_keep: int, group: int) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group not in SUPPORTED_M:
        raise ValueError(f"N:M sparsity: unsupported M={group!r}; supported M: {SUPPORTED_M}")
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep < group:
        raise ValueError(
            f"N:M sparsity: N must be an integer in [1, M-1={group - 1}], got N={n_keep!r}"
        )


def _check_weight(weight: torch.Tensor, group: int, what: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    if weight.shape[1] % group != 0:
        raise ValueError(
            f"{what} has {weight.shape[1]} columns, not a multiple of M={group}; "
            f"N:M groups of {group} consecutive columns need M to divide cols"
        )


def _label(name: str) -> str:
    return f"{name}: " if name else ""


def _bits_per_position(group: int) -> int:
    return int(math.log2(group))


def _groups_per_word(n_keep: int, group: int) -> int:
    return 32 // (n_keep * _bits_per_position(group))


def nm_meta_shape(rows: int, cols: int, n_keep: int, group: int) -> tuple[int, int]:
    """Shape (rows, ceil((cols // m) / G)) of the int32 metadata of a (rows, cols) weight."""
    _check_nm_args(n_keep, group)
    return rows, -(-(cols // group) // _groups_per_word(n_keep, group))


def nm_packed_nbytes(
    rows: int, cols: int, n_keep: int, group: int, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes of values + meta for a (rows, cols) N:M weight of ``dtype``.

    fp16 fractions of dense: 2:4 56.25 %, 4:8 62.5 % (12-bit codes, two per word), 2:8 30 %,
    1:4 ~28 %.
    """
    if cols % group != 0:
        raise ValueError(f"cols={cols} is not a multiple of M={group}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    meta_rows, meta_words = nm_meta_shape(rows, cols, n_keep, group)
    return rows * (cols // group * n_keep) * itemsize + meta_rows * meta_words * 4


def nm_group_counts(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Nonzeros (by value; NaN counts) per group of m columns: int32 (rows, cols // m)."""
    _check_weight(weight, group)
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // group, group)
    # m strided passes; a sum over a last dimension of 4 or 8 is several times slower.
    counts = nonzero[..., 0].to(torch.int32)
    for j in range(1, group):
        counts += nonzero[..., j]
    return counts


def check_nm(weight: torch.Tensor, n_keep: int, group: int, name: str = "") -> None:
    """Raise ValueError naming the first (row-major) group with more than n_keep nonzeros.

    ``name`` (a layer or parameter name) prefixes the message.
    """
    _check_nm_args(n_keep, group)
    _check_weight(weight, group, what=f"{_label(name)}weight".strip())
    counts = nm_group_counts(weight, group)
    bad = counts > n_keep
    if bool(bad.any()):
        row, index = (int(v) for v in bad.nonzero()[0])
        first = index * group
        raise ValueError(
            f"{_label(name)}weight of shape {tuple(weight.shape)} is not {n_keep}:{group} sparse: "
            f"row {row}, group {index} (columns {first}..{first + group - 1}) has "
            f"{int(counts[row, index])} nonzeros, at most {n_keep} allowed "
            f"({int(bad.sum())} offending groups in all)"
        )


def is_nm(weight: torch.Tensor, n_keep: int, group: int) -> bool:
    """True iff weight is 2-D, `group` divides cols and every group of `group` columns has at
    most n_keep nonzeros."""
    _check_nm_args(n_keep, group)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] % group:
        return False
    return bool((nm_group_counts(weight, group) <= n_keep).all())


def nm_pattern(weight: torch.Tensor) -> tuple[int, int] | None:
    """The sparsest N:M pattern (M in SUPPORTED_M, N < M) the weight satisfies, or None.

    N is the largest per-group nonzero count (at least 1). Among the M that divide cols the
    lowest ratio N/M wins; on a tie the smaller M (2:4 over 4:8: same density, and the
    pattern sparse tensor cores run).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    best: tuple[int, int] | None = None
    for group in SUPPORTED_M:
        if weight.shape[1] % group or weight.shape[1] == 0:
            continue
        n_keep = max(int(nm_group_counts(weight, group).max()), 1)
        if n_keep < group and (best is None or n_keep / group < best[0] / best[1]):
            best = (n_keep, group)
    return best


@functools.lru_cache(maxsize=32)
def _selection_table(
    n_keep: int, group: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions (4**m, n) and group codes (4**m,) for every group "priority key".

    An entry's priority is 3 for a nonzero value, 1 for a signed zero (-0.0: zero value,
    nonzero bits; kept so it survives when there is room), 0 for +0.0; a group's key packs
    its m priorities, 2 bits each. The kept positions are the n highest priorities, the
    lower position first on a tie, listed ascending. Looking the selection up per group
    (rather than sorting every group) keeps nm_compress a few elementwise passes.
    """
    keys = torch.arange(4**group, dtype=torch.int64)
    priority = (keys[:, None] >> (2 * torch.arange(group))) & 3
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    pos = order[:, :n_keep].sort(dim=-1).values
    codes = (pos << (torch.arange(n_keep) * _bits_per_position(group))).sum(dim=-1)
    return pos.to(device), codes.to(device)


def _group_keys(weight: torch.Tensor, group: int) -> torch.Tensor:
    """int32 (rows, cols // m): each group's priority key (see _selection_table)."""
    rows, cols = weight.shape
    bits = weight.reshape(rows, cols // group, group).view(_BITS_VIEW[weight.element_size()])
    sign_bit = torch.iinfo(bits.dtype).min
    # bits != 0: any nonzero pattern (+1); bits without the sign bit != 0: nonzero value (+2).
    priority = (bits != 0).to(torch.uint8) + ((bits & ~sign_bit) != 0).to(torch.uint8) * 2
    # m strided passes; a sum over a last dimension of 4 or 8 is several times slower.
    key = priority[..., 0].to(torch.int32)
    for j in range(1, group):
        key += priority[..., j].to(torch.int32) << (2 * j)
    return key


def nm_compress(
    weight: torch.Tensor, n_keep: int, group: int, *, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an N:M sparse weight (rows, cols) into (values, meta); see the module docstring.

    Returns values (rows, cols // m * n) in weight's dtype and meta int32
    (rows, ceil((cols // m) / G)), both on weight's device. Raises ValueError (naming
    ``name``, the first offending row and group) when the weight is not n:m sparse.
    """
    check_nm(weight, n_keep, group, name=name)
    if weight.dtype not in PACKABLE_DTYPES:
        raise TypeError(
            f"{_label(name)}nm_compress: unsupported dtype {weight.dtype}; supported: "
            + ", ".join(str(d) for d in PACKABLE_DTYPES)
        )
    weight = weight.detach().contiguous()
    rows, cols = weight.shape
    k_groups = cols // group
    table_pos, table_codes = _selection_table(n_keep, group, weight.device)
    keys = _group_keys(weight, group)
    pos = table_pos[keys]  # (rows, k_groups, n)
    values = weight.reshape(rows, k_groups, group).gather(-1, pos).reshape(rows, k_groups * n_keep)

    b = _bits_per_position(group)
    g = _groups_per_word(n_keep, group)
    codes = table_codes[keys]  # (rows, k_groups), n * b bits each
    words = -(-k_groups // g)
    codes = torch.nn.functional.pad(codes, (0, words * g - k_groups))
    word_shifts = torch.arange(g, device=weight.device, dtype=torch.int64) * (n_keep * b)
    packed = (codes.reshape(rows, words, g) << word_shifts).sum(dim=-1)  # in [0, 2**32)
    meta = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return values, meta


def nm_decompress(
    values: torch.Tensor, meta: torch.Tensor, n_keep: int, group: int, cols: int
) -> torch.Tensor:
    """Inverse of nm_compress: the dense (rows, cols) weight in values' dtype and device.

    Raises ValueError on inconsistent shapes or on metadata whose positions are not strictly
    ascending within a group (corrupt or foreign metadata).
    """
    _check_nm_args(n_keep, group)
    for what, t in (("values", values), ("meta", meta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"nm_decompress: {what} must be a torch.Tensor")
        if t.dim() != 2:
            raise ValueError(f"nm_decompress: {what} must be 2-D, got shape {tuple(t.shape)}")
    if meta.dtype != torch.int32:
        raise TypeError(f"nm_decompress: meta must be torch.int32, got {meta.dtype}")
    if isinstance(cols, bool) or not isinstance(cols, int) or cols <= 0 or cols % group:
        raise ValueError(
            f"nm_decompress: cols must be a positive multiple of M={group}, got {cols!r}"
        )
    rows = values.shape[0]
    k_groups = cols // group
    if values.shape != (rows, k_groups * n_keep):
        raise ValueError(
            f"nm_decompress: values must have shape ({rows}, {k_groups * n_keep}) for cols={cols} "
            f"and {n_keep}:{group}, got {tuple(values.shape)}"
        )
    expected_meta = nm_meta_shape(rows, cols, n_keep, group)
    if tuple(meta.shape) != expected_meta:
        raise ValueError(
            f"nm_decompress: meta must have shape {expected_meta}, got {tuple(meta.shape)}"
        )
    if meta.device != values.device:
        raise ValueError(
            f"nm_decompress: values on {values.device} but meta on {meta.device}; "
            "move both to one device"
        )

    pos = nm_positions(meta, n_keep, group, cols)
    dense = values.new_zeros(rows, k_groups, group)
    dense.scatter_(-1, pos, values.reshape(rows, k_groups, n_keep))
    return dense.reshape(rows, cols)


def nm_positions(meta: torch.Tensor, n_keep: int, group: int, cols: int) -> torch.Tensor:
    """The kept column positions of every group: int64 (rows, cols // m, n), in [0, m),
    ascending within each group. ValueError for metadata whose positions are not strictly
    ascending (corrupt or foreign metadata)."""
    rows, k_groups = meta.shape[0], cols // group
    b = _bits_per_position(group)
    g = _groups_per_word(n_keep, group)
    words = meta.to(torch.int64) & 0xFFFFFFFF
    word_shifts = torch.arange(g, device=meta.device, dtype=torch.int64) * (n_keep * b)
    codes = (words.unsqueeze(-1) >> word_shifts) & ((1 << (n_keep * b)) - 1)
    codes = codes.reshape(rows, -1)[:, :k_groups]
    shifts = torch.arange(n_keep, device=meta.device, dtype=torch.int64) * b
    pos = (codes.unsqueeze(-1) >> shifts) & (group - 1)  # (rows, k_groups, n)
    if n_keep > 1 and not bool((pos[..., 1:] > pos[..., :-1]).all()):
        raise ValueError(
            "nm_decompress: metadata positions are not strictly ascending within a group; "
            "the meta tensor is corrupt or not in this package's N:M format"
        )
    return pos


def nm_gather_values(
    dense: torch.Tensor, meta: torch.Tensor, n_keep: int, group: int
) -> torch.Tensor:
    """Values (rows, cols // m * n) of `dense` (rows, cols) at the kept positions of `meta`:
    repacks a weight with the same zero pattern (e.g. a merged one) under its metadata."""
    rows, cols = dense.shape
    pos = nm_positions(meta, n_keep, group, cols)
    return dense.reshape(rows, cols // group, group).gather(-1, pos).reshape(rows, -1)
