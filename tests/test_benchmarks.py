"""The benchmark suite: quick mode end to end on CPU, and the pieces its numbers rest on."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

from benchmarks import __main__ as runner
from benchmarks import bench_linear, bench_model, common, roofline, summary


@pytest.fixture
def keep_threads():
    """The runner sets torch's thread count in quick mode; give it back to the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    common.set_deadline(None)


def test_quick_mode_end_to_end(tmp_path, keep_threads, capsys):
    rc = runner.main(["--quick", "--out", str(tmp_path), "--only", "linear,model"])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = [f for f in files if f.endswith(".json") and f != "summary.json"][0][: -len(".json")]
    assert stem.startswith("cpu-quick-")
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    meta = data["meta"]
    assert meta["quick"] is True and meta["device_type"] == "cpu"
    assert meta["label"].startswith("CPU quick mode")
    assert any("triton: not measured on CPU" in n["note"] for n in data["notes"])
    assert data["errors"] == []

    rows = data["rows"]
    for row in rows:
        assert set(common.ROW_KEYS) | set(runner.ROW_META) <= set(row)
        assert row["unit"] == common.METRIC_UNITS[row["metric"]]
        assert 0 <= row["p20"] <= row["median"] <= row["p80"]
        assert row["median"] > 0
    linear = [r for r in rows if r["kernel"] == bench_linear.KERNEL]
    expected = set(bench_linear.PROVIDERS) - set(bench_linear.TRITON_PROVIDERS)
    assert {r["provider"] for r in linear} == expected
    planned = [
        (case, p)
        for case, providers in bench_linear.plan(quick=True)
        for p in providers
        if p not in bench_linear.TRITON_PROVIDERS
    ]
    per_provider = {
        p: 1 if p in bench_linear.TIME_ONLY else len(common.MODES) * 2 for _, p in planned
    }
    assert len(linear) == sum(per_provider[p] for _, p in planned)
    assert {r["extra"]["dropout"] for r in linear} == {0.0, bench_linear.DROPOUT}
    model = [r for r in rows if r["kernel"] == bench_model.KERNEL]
    assert {r["provider"] for r in model} == {"spp-torch", "spp-naive", "lora"}
    assert all(r["extra"]["tokens_per_s"] > 0 for r in model)
    assert data["roofline"] and all(e["tflops"] > 0 for e in data["roofline"])

    entries = json.loads((tmp_path / "summary.json").read_text())
    assert len(entries) == 1
    entry = entries[0]
    assert entry["quick"] is True and entry["results_file"] == f"{stem}.json"
    for name in summary.TARGETS:
        assert entry[name] is None  # triton is not measured on CPU
        assert entry["targets"][name]["met"] is None
        assert entry["torch_backend"][name] > 0
    report = (tmp_path / f"{stem}.md").read_text()
    assert "CPU quick mode" in report and "| dropout | mode | frozen |" in report
    assert all(f"| {p} |" in report for p in ("naive", "blocked", "torch", "lora"))
    capsys.readouterr()  # drop the runner's output
    assert summary.main([str(tmp_path / f"{stem}.json"), "--compact"]) == 0
    compact = capsys.readouterr().out
    assert compact.startswith("**CPU quick mode") and "fwd+bwd ms" in compact
    pytest.importorskip("matplotlib")
    assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"


def _row(kernel, provider, metric, median, shape="128x128", tokens=256, mode="full", **extra):
    m, n = (int(v) for v in shape.split("x"))
    info = {"shape": shape, "sparsity": "2:4", "m": m, "n": n, "r": 16, "dtype": "bfloat16"}
    return common.make_row(
        kernel,
        provider,
        mode,
        metric,
        "tokens",
        tokens,
        common.Stats.single(median),
        {**info, **extra},
    )


def _reference_rows(times: dict[str, list[float]], memory: dict[str, list[float]]) -> list[dict]:
    shapes, tokens = summary.reference(quick=True)
    rows = []
    for metric, table in (("time", times), ("memory", memory)):
        for provider, values in table.items():
            rows += [
                _row("spp_linear", provider, metric, v, shape=s, tokens=tokens)
                for s, v in zip(shapes, values)
            ]
    return rows


def test_summary_ratios_are_geometric_means_of_per_shape_ratios():
    rows = _reference_rows(
        times={
            "triton": [1.0, 2.0, 4.0],
            "naive": [2.0, 8.0, 4.0],
            "blocked": [1.2, 2.4, 4.8],
            "frozen": [0.5, 1.0, 2.0],
        },
        memory={"triton": [10.0, 10.0, 10.0], "lora": [10.0, 20.0, 5.0]},
    )
    rows += [_row("llama_train_step", "spp-triton", "time", 50.0)]
    rows += [_row("llama_train_step", "lora", "time", 45.0)]
    got = summary.ratios(rows, "triton", quick=True)
    assert got["speedup_vs_naive"] == pytest.approx((2 * 4 * 1) ** (1 / 3))
    assert got["speedup_vs_blocked"] == pytest.approx(1.2)
    assert got["slowdown_vs_frozen"] == pytest.approx(2.0)
    assert got["memory_vs_lora"] == pytest.approx((1 * 0.5 * 2) ** (1 / 3))
    assert got["tokens_per_s_vs_lora"] == pytest.approx(0.9)
    status = summary.target_status(got)
    assert status["speedup_vs_naive"]["met"] is True
    assert status["speedup_vs_blocked"]["met"] is False
    assert status["slowdown_vs_frozen"]["met"] is False
    assert status["memory_vs_lora"]["met"] is True
    assert status["tokens_per_s_vs_lora"]["met"] is True


def test_summary_ratio_is_none_unless_every_reference_shape_was_measured():
    rows = _reference_rows(times={"triton": [1.0, 2.0, 4.0], "naive": [2.0, 8.0]}, memory={})
    got = summary.ratios(rows, "triton", quick=True)
    assert got["speedup_vs_naive"] is None
    assert got["tokens_per_s_vs_lora"] is None


def test_update_summary_keeps_one_entry_per_device_mode_and_commit(tmp_path):
    path = tmp_path / "summary.json"
    base = {"device": "GPU A", "quick": False, "date": "d1", "git_commit": "aaa"}
    summary.update_summary(path, base)
    summary.update_summary(path, {**base, "quick": True})
    summary.update_summary(path, {**base, "date": "d2"})  # same commit: replaced
    entries = summary.update_summary(path, {**base, "date": "d3", "git_commit": "bbb"})
    assert [(e["quick"], e["date"], e["git_commit"]) for e in entries] == [
        (False, "d2", "aaa"),
        (False, "d3", "bbb"),  # a new commit is appended, the old one kept
        (True, "d1", "aaa"),
    ]
    path.write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        summary.update_summary(path, base)


def test_running_a_subset_merges_into_the_days_results(tmp_path):
    meta = common.metadata("cpu", quick=True)
    linear = [_row("spp_linear", "torch", "time", 1.0)]
    model = [_row("llama_train_step", "lora", "time", 2.0)]
    note = [{"bench": "linear", "note": "kept"}]
    paths = runner.write_results(tmp_path, meta, ["linear"], linear, note, [], plot=False)
    for row in model:
        row["bench"] = "model"
    runner.write_results(tmp_path, meta, ["model"], model, [], [], plot=False)
    data = json.loads(paths["json"].read_text())
    assert [r["kernel"] for r in data["rows"]] == ["spp_linear", "llama_train_step"]
    assert data["notes"] == note
    assert all(r["device"] == meta["device"] for r in data["rows"])


def test_cpu_peak_memory_counts_bytes_allocated_inside_the_call():
    resident = torch.empty(3 * common.MIB, dtype=torch.uint8)
    kept = []

    def fn():
        tmp = torch.empty(2 * common.MIB, dtype=torch.uint8)
        del tmp
        kept.append(torch.empty(common.MIB, dtype=torch.uint8))

    assert common.measure_peak_memory(fn, "cpu") == pytest.approx(2.0)
    assert resident.numel() == 3 * common.MIB


def test_cpu_timing_returns_ordered_quantiles():
    x = torch.randn(64, 64)
    stats = common.measure_time(lambda: x @ x, "cpu", quick=True)
    assert 0 < stats.p20 <= stats.median <= stats.p80


def test_make_row_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        common.make_row("k", "p", "sideways", "time", "x", 1, common.Stats.single(1.0))
    with pytest.raises(ValueError, match="metric"):
        common.make_row("k", "p", "full", "speed", "x", 1, common.Stats.single(1.0))
    with pytest.raises(ValueError, match="non-finite"):
        common.make_row("k", "p", "full", "time", "x", 1, common.Stats.single(math.nan))


def test_select_and_discover():
    available = runner.discover()
    assert {"linear", "model"} <= set(available)
    assert runner.select(available, "bench_linear, model", None) == ["linear", "model"]
    assert "linear" not in runner.select(available, None, "linear")
    with pytest.raises(ValueError, match="unknown benchmark"):
        runner.select(available, "nonexistent", None)


def test_a_failing_benchmark_is_recorded_and_the_others_still_run(monkeypatch):
    bad = types.ModuleType("benchmarks.bench_broken")
    bad.run = lambda quick, device: [{"kernel": "x"}]
    good = types.ModuleType("benchmarks.bench_fine")
    good.run = lambda quick, device: [_row("fine", "p", "time", 1.0)]
    monkeypatch.setitem(sys.modules, "benchmarks.bench_broken", bad)
    monkeypatch.setitem(sys.modules, "benchmarks.bench_fine", good)
    rows, _, errors = runner.run_benchmarks(["broken", "fine"], True, "cpu")
    assert [r["kernel"] for r in rows] == ["fine"] and rows[0]["bench"] == "fine"
    assert errors[0]["bench"] == "broken" and "lacks keys" in errors[0]["error"]


def test_linear_providers_compute_the_same_layer():
    case = bench_linear.Case("t", 32, 16, 8, "2:4")
    s = bench_linear.make_input_set(case, "cpu", seed=3)
    w = s.weight.float()
    assert ((w.view(32, 4, 4) != 0).sum(-1) <= 2).all()
    scale = bench_linear.SCALE
    groups = torch.arange(32) * bench_linear.R // 32
    w_prime = w * s.alpha.float()[groups] * s.beta.float()[:, None]
    x = s.x.float()
    expected = x @ w.t() + scale * x @ w_prime.t()
    for provider in ("torch", "naive", "blocked"):
        y = bench_linear.FORWARDS[provider](s).float()
        torch.testing.assert_close(y, expected, atol=0.05, rtol=0.02)
    lora = x @ w.t() + scale * (x @ s.lora_a.float().t()) @ s.lora_b.float().t()
    torch.testing.assert_close(bench_linear.FORWARDS["lora"](s).float(), lora, atol=0.05, rtol=0.02)
    torch.testing.assert_close(bench_linear.FORWARDS["frozen"](s), F.linear(s.x, s.weight))
    bench_linear.FORWARDS["masked-ft"](s).backward(s.dy)
    assert (s.ft_weight.grad[s.weight == 0] == 0).all()
    assert (s.ft_weight.grad[s.weight != 0] != 0).any()


def test_roofline_counts_and_floor():
    assert roofline.step_flops("frozen", 4, 8, 16) == 4 * 16 * 4 * 8
    assert roofline.step_flops("triton", 4, 8, 16) == 6 * 16 * 4 * 8
    with pytest.raises(ValueError, match="lora"):
        roofline.step_flops("lora", 4, 8, 16)
    rows = [_row("spp_linear", "frozen", "time", 2.0), _row("spp_linear", "naive", "time", 6.0)]
    by_provider = {e["provider"]: e for e in roofline.roofline_rows(rows)}
    assert by_provider["naive"]["floor_ms"] == pytest.approx(3.0)  # 6/4 of frozen's time
    assert by_provider["naive"]["tflops"] == pytest.approx(by_provider["frozen"]["tflops"] / 2)


def test_sigterm_becomes_interrupted_and_stops_new_cases(monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(common, "_interrupted", False)
    try:
        common.interrupt_on_sigterm()
        with pytest.raises(common.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode, long before this ends
        assert common.interrupted() and common.out_of_time()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_cuda_timing_tops_up_slow_calls_to_min_reps(monkeypatch):
    """The do_bench wiring, without a GPU: a fake do_bench stands in for triton's."""
    triton_testing = pytest.importorskip("triton.testing")
    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        calls.append({"warmup": warmup, "rep": rep, "grads": grad_to_none})
        assert return_mode == "all"
        return [40.0, 50.0] if len(calls) == 1 else [45.0, 55.0, 60.0]

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    x = torch.zeros(1, requires_grad=True)
    stats = common.measure_time(lambda: None, "cuda", quick=False, grad_to_none=[x])
    plan = common.timing_plan(quick=False, device="cuda")
    assert calls[0]["rep"] == plan.rep_ms and calls[0]["grads"] == [x]
    assert calls[1]["rep"] == pytest.approx(3 * 40.0)  # 3 missing calls x median of the first
    assert stats == common.quantile_stats([40.0, 50.0, 45.0, 55.0, 60.0])
    assert stats.median == 50.0 and stats.p20 == pytest.approx(44.0)


def test_small_step_measures_both_providers_on_the_same_pruned_base():
    """bench_small_step (issue 24 part 2): LoRA and SPP rows at both dropout rates, with
    SPP's tokens/s ratio computed from the two medians of the same run; a tiny LLaMA
    stands in for the embedded SmolLM2 (which the full run loads)."""
    from benchmarks import bench_small_step
    from spp_kernels.pruning import prune

    from .helpers import make_tiny_llama

    def tiny():
        model = make_tiny_llama(seed=3)
        prune(model, "magnitude", "2:4", progress=False)
        return model.requires_grad_(False)

    rows = list(bench_small_step.run(quick=True, device="cpu", model_fn=tiny))
    assert [(r["provider"], r["x_value"]) for r in rows] == [
        ("lora", 0.0), ("spp", 0.0), ("lora", 0.05), ("spp", 0.05)
    ]  # fmt: skip
    for p in bench_small_step.DROPOUTS:
        lora, spp = (r for r in rows if r["x_value"] == p)
        assert spp["extra"]["spp_over_lora_tokens_s"] == round(lora["median"] / spp["median"], 3)
        assert spp["extra"]["tokens_per_s"] == round(64 / (spp["median"] / 1e3), 1)
        assert all(r["median"] > 0 and r["extra"]["sparsity"] == "2:4" for r in (lora, spp))
    assert list(bench_small_step.run(quick=True, device="cuda")) == []
    common.take_notes()


def test_profile_small_step_lists_operators_of_both_providers():
    """benchmarks.profile_small_step: one profiled step per provider; SPP's own autograd
    node and the GEMMs appear, with call counts (a tiny LLaMA stands in for SmolLM2)."""
    from benchmarks.profile_small_step import GEMMS, profile_providers
    from spp_kernels.pruning import prune

    from .helpers import make_tiny_llama

    model = make_tiny_llama(seed=4)
    prune(model, "magnitude", "2:4", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    times = profile_providers(model.requires_grad_(False), ids, dropout=0.05)
    assert set(times) == {"lora", "spp"}
    assert any(key in times["spp"] for key in GEMMS) and any(k in times["lora"] for k in GEMMS)
    assert "_EagerSPPLinear" in times["spp"] and "_EagerSPPLinear" not in times["lora"]
    assert all(ms >= 0 and calls > 0 for ms, calls in times["spp"].values())


def test_recovery_protocol_quick_runs_grids_seeds_and_paired_differences(tmp_path, keep_threads,
                                                                         capsys):  # fmt: skip
    from benchmarks import recovery_protocol

    assert recovery_protocol.main(["--quick", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("recovery-protocol-*.json")
    data = json.loads(result.read_text())
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds.count("lr-grid") == 3 * 2  # three methods, two rates each in quick mode
    rates = next(r for r in data["rows"] if r["kind"] == "chosen-rates")
    for method in ("spp", "lora*", "masked-ft"):
        grid = [r for r in data["rows"] if r["kind"] == "lr-grid" and r["method"] == method]
        assert rates[method] == min(grid, key=lambda r: r["validation_ppl"])["lr"]
        runs = [r for r in data["rows"] if r["kind"] == "run" and r["method"] == method]
        assert [r["seed"] for r in runs] == [0, 1] and {r["lr"] for r in runs} == {rates[method]}
    spp = next(r for r in data["summary"] if r["method"] == "spp")
    runs = {r["method"]: {x["seed"]: x["ppl"] for x in data["rows"]
                          if x["kind"] == "run" and x["method"] == r["method"]}
            for r in data["summary"]}  # fmt: skip
    diffs = [runs["spp"][k] - runs["lora*"][k] for k in (0, 1)]
    assert spp["spp_minus_lora_mean"] == pytest.approx(sum(diffs) / 2)
    assert any(r["kind"] == "pruned" and "DSnoT" in r["setting"] for r in data["rows"])
    assert all(r["zeros_kept"] for r in data["rows"] if r["kind"] == "run")
    ablations = [r for r in data["rows"] if r["kind"] == "ablation"]
    assert {r["variant"] for r in ablations} == {"init=both_random", "r=4"}
    assert {r["r"] for r in ablations if r["variant"] == "r=4"} == {4}
    # any row reruns alone, in another process layout, to the same numbers
    row = next(r for r in data["rows"] if r["kind"] == "run" and r["method"] == "lora*")
    capsys.readouterr()
    assert (
        recovery_protocol.main(["--quick", "--unit", row["unit"], "--rates-from", str(result)]) == 0
    )
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl"] == row["ppl"] and again["loss_last"] == row["loss_last"]


def test_lowbit_quality_quick_trains_every_low_bit_format_and_keeps_zeros(tmp_path, keep_threads):
    pytest.importorskip("bitsandbytes")
    from benchmarks import lowbit_quality

    assert lowbit_quality.main(["--quick", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("lowbit-quality-*.json")
    rows = json.loads(result.read_text())["rows"]
    spp = {r["format"]: r for r in rows if r.get("method") == "spp"}
    assert set(spp) == set(lowbit_quality.FORMATS)
    assert all(r["zeros_kept"] for r in spp.values())
    assert spp["2:4 int4"]["int4_group"] == 64  # tiny model: packed rows of 64 and 128
    assert any(r.get("method") == "qlora*" for r in rows)
    assert "2:4 int4 (group 64)" in (tmp_path / result.name.replace(".json", ".md")).read_text()


def test_lowbit_step_rows_for_every_format_and_the_ratio_table(keep_threads):
    """bench_lowbit (issue 22 part 5): one step per low-bit base format and LoRA on the same
    base, at both dropout rates; the table gives ratios to 2:4 bf16 and to LoRA."""
    from benchmarks import bench_lowbit

    rows = list(bench_lowbit.run(quick=True, device="cpu"))
    providers = {r["provider"] for r in rows}
    expected = {"2:4 bf16", *(f"2:4 {f}" for f in bench_lowbit.LOW_BIT),
                *(f"lora 2:4 {f}" for f in bench_lowbit.LOW_BIT)}  # fmt: skip
    assert expected <= providers
    assert {r["x_value"] for r in rows} == set(bench_lowbit.DROPOUTS)
    assert all(r["median"] > 0 and r["extra"]["shape"] == [256, 256] for r in rows)
    table = bench_lowbit.ratio_table(rows)
    assert "| 256 x 256 | 0.0 | 2:4 int4 |" in table and "1.00x" in table
