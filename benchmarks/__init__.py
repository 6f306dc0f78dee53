"""spp-kernels benchmark suite: `python -m benchmarks [--quick] [--out DIR] [--only NAMES]`.

Every module `benchmarks/bench_<name>.py` exposes `run(quick: bool, device: str) -> list[dict]`
returning rows of the shared schema (see `benchmarks.common.make_row`); the runner
(`benchmarks.__main__`) collects them, adds device and version metadata, and writes
`results/<device>-<date>.json`, a markdown table, a PNG plot and `results/summary.json`.
Method and caveats: benchmarks/NOTES.md.
"""
