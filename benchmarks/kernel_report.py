"""Static report of every shipped Triton kernel config, compiled for a GPU without a GPU.

    python -m benchmarks.kernel_report [--arch sm_90a|sm_80] [--json PATH] [--dtype bf16,fp16]
                                       [--only forward,dx,...] [--jobs N]

Each kernel variant (dense and 2:4-packed weights, p = 0 and p > 0, bf16 / fp16, every
config in its shipped list) is compiled with `triton.compile` for a `GPUTarget` at the
reference specialisation (LLaMA-7B: T = 8192 tokens, m = n = 4096, r = 16, contiguous
operands, fp32 adapters), then the PTX goes through the ptxas that ships with triton
(`-v`) and the cubin through `cuobjdump -sass`. Reported per row: registers, spill bytes
(stores + loads), shared memory, the number of wgmma (sm_90) / mma (sm_80) instructions
in the SASS, whether ptxas serialised wgmma (warning C7515, with its reason), and the
instruction count of the main loop (the innermost backward-branch loop that holds the MMA
instructions) together with its MMA and global-load counts.

It is the GPU-free proxy for kernel performance between GPU runs: spills and serialised
wgmma are visible here, times are not. Needs no GPU, but must run without
TRITON_INTERPRET (the interpreter replaces @triton.jit functions); the module clears it
before importing triton and refuses to run if triton was already imported under it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REF_TOKENS, REF_M, REF_N, REF_R = 8192, 4096, 4096, 16
DTYPES = ("bf16", "fp16")
KERNELS = ("forward", "dx", "dalpha_dbeta", "reduce", "weight_chunk", "dropout_bits")


@dataclass
class Variant:
    """One kernel specialisation to compile."""

    kernel: str  # report name
    module: str  # csrc_triton module
    fn: str  # jit function name
    dtype: str
    weight: str  # "dense" | "2:4"
    dropout: bool
    config: dict[str, Any]  # constexpr block sizes
    num_warps: int
    num_stages: int
    extra: dict[str, Any]  # other constexprs

    @property
    def label(self) -> str:
        blocks = "x".join(str(v) for k, v in self.config.items() if k.startswith("BLOCK_"))
        return (
            f"{self.kernel} {self.dtype} {self.weight} p{'>0' if self.dropout else '=0'} "
            f"[{blocks} w{self.num_warps} s{self.num_stages}]"
        )


def _clear_interpreter() -> None:
    if os.environ.pop("TRITON_INTERPRET", None) == "1" and "triton" in sys.modules:
        raise RuntimeError("kernel_report must run in a process without TRITON_INTERPRET=1")


def _unwrap(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def variants(dtypes=DTYPES, only=KERNELS, arch: str = "sm_90a") -> list[Variant]:
    """Every shipped config of every kernel variant for `arch`'s config table (the report's
    rows), in order."""
    _clear_interpreter()
    import csrc_triton.spp_backward as B
    import csrc_triton.spp_forward as F
    from csrc_triton._launch import alpha_groups, arch_of

    table = arch_of(_capability(arch))

    out = []
    for dtype in dtypes:
        for weight in WEIGHTS:
            nm = weight_constexprs(weight)
            for dropout in (False, True):
                base = dict(DROPOUT=dropout, UPCAST=False, PRECISION="tf32", **nm)
                low_bit = weight in _LOW_BIT
                if "forward" in only:
                    tables = F.FORWARD_LOW_BIT_CONFIGS if low_bit else F.FORWARD_CONFIGS
                    for c in tables[table]:
                        groups = alpha_groups(c.kwargs["BLOCK_M"], REF_R, REF_M)
                        extra = dict(base, HAS_BIAS=True, NUM_GROUPS=groups)
                        out.append(Variant("forward", "spp_forward", "_spp_forward_kernel", dtype,
                                           weight, dropout, dict(c.kwargs), c.num_warps,
                                           c.num_stages, extra))  # fmt: skip
                if "dx" in only:
                    for c in (B.DX_LOW_BIT_CONFIGS if low_bit else B.DX_CONFIGS)[table]:
                        groups = alpha_groups(c.kwargs["BLOCK_K"], REF_R, REF_M)
                        extra = dict(base, NUM_GROUPS=groups)
                        out.append(Variant("dx", "spp_backward", "_spp_dx_kernel", dtype, weight,
                                           dropout, dict(c.kwargs), c.num_warps, c.num_stages,
                                           extra))  # fmt: skip
                if "dalpha_dbeta" in only:
                    for c in B.DAB_CONFIGS[table]:
                        groups = alpha_groups(B.DAB_BLOCK_M, REF_R, REF_M)
                        blocks = dict(BLOCK_M=B.DAB_BLOCK_M, BLOCK_N=B.DAB_BLOCK_N,
                                      GROUP_M=B.DAB_GROUP_M, **c.kwargs)  # fmt: skip
                        out.append(Variant("dalpha_dbeta", "spp_backward",
                                           "_spp_dalpha_dbeta_kernel", dtype, weight, dropout,
                                           blocks, c.num_warps, c.num_stages,
                                           dict(base, NUM_GROUPS=groups)))  # fmt: skip
            if "weight_chunk" in only:
                import csrc_triton.weight_chunks as W

                for mode in (0, 1, 2):
                    groups = alpha_groups(W.CHUNK_BLOCK_M, REF_R, REF_M)
                    blocks = dict(BLOCK_M=W.CHUNK_BLOCK_M, BLOCK_N=W.CHUNK_BLOCK_N)
                    out.append(Variant(f"weight_chunk[mode {mode}]", "weight_chunks",
                                       "_weight_chunk_kernel", dtype, weight, False, blocks, 4, 1,
                                       dict(MODE=mode, NUM_GROUPS=groups, **nm)))  # fmt: skip
        if "dropout_bits" in only:
            import csrc_triton.dropout_bits as D

            for add in (False, True):
                out.append(Variant(f"keep_bits_elementwise[add={add}]", "dropout_bits",
                                   "_keep_bits_elementwise_kernel", dtype, "-", True,
                                   dict(BLOCK_T=32, BLOCK_N=128), 4, 1, dict(ADD=add)))  # fmt: skip
    if "reduce" in only:
        out.append(Variant("dalpha_reduce", "spp_backward", "_spp_dalpha_reduce_kernel", "fp32",
                           "-", False, dict(TILE_M=B.DAB_BLOCK_M, BLOCK_N=B.REDUCE_BLOCK_N), 4, 1,
                           {}))  # fmt: skip
    if "dropout_bits" in only:
        import csrc_triton.dropout_bits as D

        out.append(Variant("draw_keep_bits", "dropout_bits", "_draw_keep_bits_kernel", "u8", "-",
                           True, dict(BLOCK_T=D.BLOCK_T, BLOCK_BYTES=D.BLOCK_BYTES), 4, 1, {}))  # fmt: skip
    return out


# Frozen-weight kinds of the report: dense, 2:4 packed float values, 2:4 packed low-bit
# codes (spp_kernels.sparsity.lowbit; int4 at its default group of 128 kept values).
WEIGHTS = ("dense", "2:4", "2:4 int8", "2:4 fp8", "2:4 int4")
_LOW_BIT = {"2:4 int8": (1, 1), "2:4 fp8": (2, 1), "2:4 int4": (3, 128)}
_CODE_TYPES = {"2:4 int8": ("*i8", "*fp32"), "2:4 fp8": ("*u8", "*fp32"),
               "2:4 int4": ("*u8", "*bf16")}  # fmt: skip


def weight_constexprs(weight: str) -> dict[str, int]:
    """N_KEEP, NM_GROUP, VALUES and SCALE_GROUP of a report weight kind."""
    if weight == "dense":
        return {"N_KEEP": 0, "NM_GROUP": 0, "VALUES": 0, "SCALE_GROUP": 1}
    values, group = _LOW_BIT.get(weight, (0, 1))
    return {"N_KEEP": 2, "NM_GROUP": 4, "VALUES": values, "SCALE_GROUP": group}


# Pointer element types by argument name; activations take the variant's dtype.
_DATA = {"x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr", "a_ptr", "out_ptr"}
_FLOATS = {"scale", "keep_scale", "grad_scale", "p"}
# Unit strides of contiguous operands: Triton specialises an int argument equal to 1.
_UNIT = {"stride_xn", "stride_wn", "stride_an", "stride_ym", "stride_dym", "stride_dxn",
         "stride_beta", "stride_bias", "stride_on"}  # fmt: skip


def _signature(kernel, v: Variant) -> tuple[dict, dict, dict]:
    consts = dict(v.config, **v.extra)
    consts.update({k: 1 for k in _UNIT if k in kernel.arg_names})
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name == "meta_ptr":
            sig[name] = "*i32"
        elif name in ("w_ptr", "scale_ptr") and v.weight in _CODE_TYPES:
            sig[name] = _CODE_TYPES[v.weight][name == "scale_ptr"]
        elif name == "scale_ptr":
            sig[name] = f"*{v.dtype}"  # the weight itself, never read
        elif name in ("keep_ptr", "bits_ptr"):
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = f"*{v.dtype}" if name in _DATA else "*fp32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
        free = ("seed", "r", "slots", "row0", "rows", "p", "stride_scale")
        if sig[name] != "fp32" and name not in free:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def _sass_loop_stats(sass: str, arch: int) -> dict[str, int]:
    """(instructions, mma, global loads) of the innermost loop holding MMA instructions.

    A loop is a backward branch (BRA to a lower address); its body is every instruction
    from the target address to the branch.
    """
    code = []
    for raw in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    mma = "HGMMA" if arch >= 90 else "HMMA"
    best = None
    for address, text in code:
        branch = re.search(r"\bBRA(?:\.\w+)?\s+0x([0-9a-f]+)", text)
        if not branch or int(branch.group(1), 16) >= address:
            continue
        start = int(branch.group(1), 16)
        body = [t for a, t in code if start <= a <= address]
        if any(mma in t for t in body) and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        return {"loop_instructions": 0, "loop_mma": 0, "loop_global_loads": 0}
    opcodes = [t.split()[1] if t.startswith("@") else t.split()[0] for t in best if t.split()]
    return {
        "loop_instructions": len(best),
        "loop_mma": sum(op.startswith(mma) for op in opcodes),
        "loop_global_loads": sum(op.startswith("LDG") for op in opcodes),
    }


def _capability(arch: str) -> tuple[int, int]:
    """ "sm_90a" -> (9, 0), "sm_80" -> (8, 0), "sm_86" -> (8, 6)."""
    digits = re.sub(r"\D", "", arch)
    return int(digits[:-1]), int(digits[-1])


def compile_variant(v: Variant, arch: str) -> dict[str, Any]:
    """Compile one variant and read its resource use; a dict row of the report."""
    _clear_interpreter()
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = int(re.sub(r"\D", "", arch))
    kernel = _unwrap(getattr(importlib.import_module(f"csrc_triton.{v.module}"), v.fn))
    sig, consts, attrs = _signature(kernel, v)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"label": v.label, **asdict(v), "arch": arch}
    # MLIR prints failing pipelines to fd 2 from C++: keep that out of the report's output.
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as errors:
        os.dup2(errors.fileno(), 2)
        try:
            compiled = triton.compile(
                ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": v.num_warps, "num_stages": v.num_stages},
            )
        except Exception as e:  # a config that does not compile is a report row, not a crash
            errors.seek(0)
            first = [ln for ln in errors.read().decode(errors="replace").splitlines() if ln][:1]
            row.update(error=f"{type(e).__name__}: {(first or [str(e)])[0][:300]}")
            return row
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        gpu = arch if arch.endswith("a") or capability < 90 else f"{arch}a"
        done = subprocess.run(
            [_tool("ptxas"), "-v", "-lineinfo", f"--gpu-name={gpu}", str(ptx_path), "-o",
             str(cubin_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        info = done.stderr
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin_path)], capture_output=True, text=True
        ).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill_st = re.search(r"(\d+) bytes spill stores", info)
    spill_ld = re.search(r"(\d+) bytes spill loads", info)
    serialized = re.findall(r"C7515[^\n]*?wgmma[^\n]*", info)
    row.update(
        registers=int(regs.group(1)) if regs else None,
        spill_bytes=(int(spill_st.group(1)) if spill_st else 0)
        + (int(spill_ld.group(1)) if spill_ld else 0),
        shared_bytes=int(compiled.metadata.shared),
        wgmma=ptx.count("wgmma.mma_async"),
        mma_sass=sass.count("HGMMA" if capability >= 90 else "HMMA"),
        wgmma_serialized=bool(serialized),
        serialized_reason=(serialized[0].split("due to")[-1].strip()[:160] if serialized else ""),
        ptxas_returncode=done.returncode,
        **_sass_loop_stats(sass, capability),
    )
    return row


def _compile_job(args):
    return compile_variant(*args)


def run(arch: str = "sm_90a", dtypes=DTYPES, only=KERNELS, jobs: int = 2) -> list[dict]:
    todo = variants(dtypes, only, arch)
    if jobs <= 1:
        return [compile_variant(v, arch) for v in todo]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_job, [(v, arch) for v in todo]))


def format_table(rows: list[dict]) -> str:
    header = ("kernel variant [blocks warps stages]", "regs", "spill B", "smem KB", "wgmma",
              "serialized", "loop instr", "loop mma", "loop LDG")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | compile error: {r['error']} |")
            continue
        cells = (
            r["label"], r["registers"], r["spill_bytes"], f"{r['shared_bytes'] / 1024:.0f}",
            r["mma_sass"], "yes: " + r["serialized_reason"] if r["wgmma_serialized"] else "no",
            r["loop_instructions"], r["loop_mma"], r["loop_global_loads"],
        )  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", default="sm_90a", help="sm_90a (H100/H200) or sm_80 (A100)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--dtype", default=",".join(DTYPES), help="bf16,fp16")
    parser.add_argument("--only", default=",".join(KERNELS), help=",".join(KERNELS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    _clear_interpreter()
    t0 = time.perf_counter()
    rows = run(args.arch, tuple(args.dtype.split(",")), tuple(args.only.split(",")), args.jobs)
    print(format_table(rows))
    spilling = [r["label"] for r in rows if r.get("spill_bytes")]
    errors = [r["label"] for r in rows if "error" in r]
    print(
        f"\n{len(rows)} variants for {args.arch} in {time.perf_counter() - t0:.0f} s; "
        f"spilling: {len(spilling)}; serialized wgmma: "
        f"{sum(bool(r.get('wgmma_serialized')) for r in rows)}; compile errors: {len(errors)}"
    )
    if args.json:
        import triton

        from csrc_triton._launch import arch_of

        meta = {"arch": args.arch, "config_table": arch_of(_capability(args.arch)),
                "triton": triton.__version__, "reference": {
            "tokens": REF_TOKENS, "m": REF_M, "n": REF_N, "r": REF_R}}  # fmt: skip
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
