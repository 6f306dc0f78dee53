"""FLOPs and minimum bytes of one linear layer's training step, and achieved rates.

For X (T, n), W (m, n), dY (T, m), e bytes per element, one forward + backward:
  frozen (Y and dX only):      FLOPs = 2Tmn (Y) + 2Tmn (dX)                     = 4Tmn
                               bytes >= e (Tn + mn + Tm) + e (Tm + mn + Tn)
  SPP (any implementation):    FLOPs = 2Tmn (Y, merged weight) + 2Tmn (dX)
                                     + 2Tmn (G = dY^T X for dalpha, dbeta)      = 6Tmn
                               bytes >= frozen's + e (Tn) (X read again for G)
                                        + e (2(rn + m)) (alpha, beta and their gradients)
Elementwise work on W (O(mn)) is left out of the FLOPs. The SPP count is the work of the
math, whatever the implementation does; naive and blocked do more, so their rate is an
"effective" rate. The floor: the frozen layer's achieved TFLOP/s, and the time SPP would
take at that rate (6/4 of the frozen time), which is why the target allows 1.6x.
"""

from __future__ import annotations

from typing import Any

SPP_PROVIDERS = ("triton", "torch", "naive", "blocked")
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def step_flops(provider: str, m: int, n: int, tokens: int) -> float:
    """FLOPs of forward + backward (see the module docstring); frozen or SPP only."""
    base = 2.0 * tokens * m * n
    if provider == "frozen":
        return 2 * base
    if provider in SPP_PROVIDERS:
        return 3 * base
    raise ValueError(f"step_flops: no FLOP model for provider {provider!r}")


def step_min_bytes(provider: str, m: int, n: int, tokens: int, r: int, dtype: str) -> float:
    """Least bytes forward + backward must move (each operand read or written once)."""
    e = BYTES[dtype]
    frozen = e * (2 * tokens * n + 2 * m * n + 2 * tokens * m)
    if provider == "frozen":
        return frozen
    if provider in SPP_PROVIDERS:
        return frozen + e * tokens * n + e * 2 * (r * n + m)
    raise ValueError(f"step_min_bytes: no byte model for provider {provider!r}")


def roofline_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, tokens, sparsity): achieved TFLOP/s of each SPP provider and frozen.

    Uses the "full" (forward + backward) time rows of the spp_linear kernel.
    """
    full = [
        r
        for r in rows
        if r["kernel"] == "spp_linear" and r["metric"] == "time" and r["mode"] == "full"
    ]
    frozen = {
        (r["extra"]["shape"], r["x_value"], r["extra"]["sparsity"]): r
        for r in full
        if r["provider"] == "frozen"
    }
    out = []
    for r in full:
        if r["provider"] not in (*SPP_PROVIDERS, "frozen"):
            continue
        x = r["extra"]
        key = (x["shape"], r["x_value"], x["sparsity"])
        m, n, t = x["m"], x["n"], r["x_value"]
        flops = step_flops(r["provider"], m, n, t)
        nbytes = step_min_bytes(r["provider"], m, n, t, x["r"], x["dtype"])
        seconds = r["median"] / 1e3
        entry = {
            "shape": x["shape"],
            "tokens": t,
            "sparsity": x["sparsity"],
            "provider": r["provider"],
            "time_ms": r["median"],
            "gflop": flops / 1e9,
            "min_mb": nbytes / 2**20,
            "flop_per_byte": flops / nbytes,
            "tflops": flops / seconds / 1e12,
            "frozen_tflops": None,
            "floor_ms": None,
        }
        if key in frozen:
            f = frozen[key]
            frozen_rate = step_flops("frozen", m, n, t) / (f["median"] / 1e3)
            entry["frozen_tflops"] = frozen_rate / 1e12
            entry["floor_ms"] = flops / frozen_rate * 1e3
        out.append(entry)
    return out
