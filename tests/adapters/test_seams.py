"""Issue 19: SPP artefacts open where users already are, with no `import spp_kernels`.

Each case runs a fresh interpreter that never imports spp_kernels itself (the start-up
hook installed with the package registers SPP when peft is imported, and the 2:4 format
when transformers' quantizer table is): peft's and transformers' loaders, lm-eval's
command line, transformers' own adapter API and Trainer, and `from_pretrained` of a
`spp export-2to4` directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from spp_kernels.cli import main
from tests.helpers import make_cli_models

NO_IMPORT_GUARD = "import sys\nassert 'spp_kernels' not in sys.modules\n"


def run_fresh(code: str, cwd, env_extra: dict | None = None, timeout: int = 300):
    """Run `code` in a new interpreter (cwd `cwd`, offline); returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)  # the installed package (and its hook), not the source tree
    script = NO_IMPORT_GUARD + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """root/{pruned, adapter (spp train), peft_adapter (get_peft_model + save_pretrained),
    merged, export (spp export-2to4)} from the tiny pruned LLaMA, and reference logits."""
    root = make_cli_models(tmp_path_factory.mktemp("seams"), adapter=True)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from spp_kernels import SPPConfig, get_spp_model

    spp = get_peft_model(
        AutoModelForCausalLM.from_pretrained(root / "pruned"), SPPConfig(r=4, init="both_random")
    )
    spp.save_pretrained(root / "peft_adapter")
    legacy = get_spp_model(
        AutoModelForCausalLM.from_pretrained(root / "pruned"), SPPConfig(r=2, init="both_random")
    )
    legacy.save_pretrained(root / "spp_model_adapter")
    for argv in (
        [
            "merge",
            "--model",
            root / "pruned",
            "--adapter",
            root / "adapter",
            "--out",
            root / "merged",
        ],
        ["export-2to4", "--model", root / "merged", "--out", root / "export"],
    ):
        assert main([*map(str, argv), "--quiet"]) == 0
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
        generated = merged.generate(ids[:1], max_new_tokens=4, do_sample=False)
    torch.save({"ids": ids, "logits": logits, "generated": generated}, root / "reference.pt")
    return root


# ---- 1. every Hugging Face entry point opens an SPP adapter with no import ----------------


@pytest.mark.parametrize("adapter", ["adapter", "peft_adapter", "spp_model_adapter"])
def test_1_3_peft_and_transformers_open_spp_adapters_without_an_import(artefacts, adapter):
    """PeftConfig, AutoPeftModelForCausalLM, transformers' load_adapter and
    AutoModelForCausalLM.from_pretrained(adapter_dir), on adapters written by `spp train`,
    by peft's get_peft_model and by spp-kernels' get_spp_model: the same logits."""
    result = run_fresh(f"""
        import torch
        from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
        from transformers import AutoModelForCausalLM

        assert str(PeftConfig.from_pretrained("{adapter}").peft_type) in ("SPP", "PeftType.SPP")
        ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
        auto = AutoPeftModelForCausalLM.from_pretrained("{adapter}")
        base = AutoModelForCausalLM.from_pretrained("pruned")
        base.load_adapter("{adapter}")
        direct = AutoModelForCausalLM.from_pretrained("{adapter}")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("pruned"), "{adapter}")
        with torch.no_grad():
            want = peft(input_ids=ids).logits
            for model in (auto, base, direct):
                assert torch.equal(model(input_ids=ids).logits, want)
            with peft.disable_adapter():
                assert not torch.equal(peft(input_ids=ids).logits, want)
        print("OK", "spp_kernels" in sys.modules)
    """, artefacts)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK True" in result.stdout


def test_1_the_hook_is_what_makes_it_work_and_can_be_turned_off(artefacts):
    code = """
        from peft import PeftConfig
        PeftConfig.from_pretrained("adapter")
    """
    assert run_fresh(code, artefacts).returncode == 0
    off = run_fresh(code, artefacts, {"SPP_KERNELS_NO_HOOK": "1"})
    assert off.returncode != 0 and "KeyError: 'SPP'" in off.stderr


def test_1_lm_eval_command_line_evaluates_an_spp_adapter(artefacts, tmp_path):
    """`lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER` as typed, on a local
    two-question task: exit 0 and an accuracy."""
    (tmp_path / "d.jsonl").write_text(
        '{"text": "the quick brown", "choices": ["fox", "dog"], "label": 0}\n'
        '{"text": "over the lazy", "choices": ["cat", "dog"], "label": 1}\n'
    )
    (tmp_path / "tiny_mc.yaml").write_text(textwrap.dedent(f"""
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "d.jsonl"}
        output_type: multiple_choice
        test_split: test
        doc_to_text: "{{{{text}}}}"
        doc_to_choice: choices
        doc_to_target: label
        metric_list:
          - metric: acc
        metadata:
          version: 1.0
    """))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    out = tmp_path / "results"
    run = subprocess.run(
        [lm_eval, "--model", "hf", "--model_args",
         f"pretrained={artefacts / 'pruned'},peft={artefacts / 'adapter'}", "--tasks", "tiny_mc",
         "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "1",
         "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert "peft" in json.loads(result.read_text())["config"]["model_args"]


# What the hook adds to `import peft`: its own module at start-up and the two registering
# imports it runs (each line's cumulative time holds the spp_kernels modules below it).
HOOK_IMPORTS = ("_spp_kernels_hook", "spp_kernels.adapters", "spp_kernels.sparsity.hf_quantizer")


def test_1_import_peft_costs_under_50_ms_more(tmp_path):
    """-X importtime of `python -c "import peft"`, the best of three runs."""

    def hook_ms() -> float:
        env = {**os.environ}
        env.pop("PYTHONPATH", None)
        run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import peft"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        found = {}
        for line in run.stderr.splitlines():
            parts = line.split("|")
            if (
                line.startswith("import time:")
                and len(parts) == 3
                and parts[2].strip() in HOOK_IMPORTS
            ):
                found[parts[2].strip()] = int(parts[1])
        assert set(found) == set(HOOK_IMPORTS), found
        return sum(found.values()) / 1000

    best = min(hook_ms() for _ in range(3))
    print(f"import peft: {best:.1f} ms in spp-kernels' hook and registration")
    assert best < 50


# ---- 2. transformers' own adapter API -------------------------------------------------------


def test_2_transformers_adapter_api_works_with_spp(artefacts, tmp_path):
    result = run_fresh(f"""
        import torch
        from peft import PeftConfig
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained("pruned")
        config = PeftConfig.from_pretrained("peft_adapter")  # an SPPConfig
        fresh = type(config)(r=2, init="both_random")
        model.add_adapter(fresh, adapter_name="mine")
        model.load_adapter("adapter", adapter_name="trained")
        model.set_adapter("trained")
        assert model.active_adapters() == ["trained"]
        ids = torch.randint(0, 100, (1, 8))
        with torch.no_grad():
            on = model(input_ids=ids).logits
            model.disable_adapters()
            off = model(input_ids=ids).logits
            model.enable_adapters()
            assert torch.equal(model(input_ids=ids).logits, on) and not torch.equal(on, off)
        state = model.get_adapter_state_dict("trained")
        assert state and all(".spp_" in k for k in state)
        model.delete_adapter("mine")
        model.save_pretrained("{tmp_path / 'saved'}")
        print("OK")
    """, artefacts)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPP"


def test_2_trainer_on_a_load_adapter_model_saves_checkpoints(artefacts, tmp_path):
    result = run_fresh(f"""
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

        model = AutoModelForCausalLM.from_pretrained("pruned")
        model.load_adapter("adapter", is_trainable=True)
        rows = [list(range(i, i + 16)) for i in range(8)]
        data = Dataset.from_dict({{"input_ids": rows, "labels": rows}})
        args = TrainingArguments(output_dir="{tmp_path / 'run'}", max_steps=2, save_steps=1,
                                 per_device_train_batch_size=2, report_to=[], use_cpu=True)
        Trainer(model=model, args=args, train_dataset=data).train()
        print("OK")
    """, artefacts)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (1, 2):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file()
        assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "SPP"


# ---- 4. the 2:4 export opens with from_pretrained -------------------------------------------


def test_4_export_opens_with_from_pretrained_bit_exact(artefacts):
    result = run_fresh("""
        import torch
        from transformers import AutoModelForCausalLM

        ref = torch.load("reference.pt")
        model = AutoModelForCausalLM.from_pretrained("export")
        with torch.no_grad():
            assert torch.equal(model(input_ids=ref["ids"]).logits, ref["logits"])
        out = model.generate(ref["ids"][:1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, ref["generated"])
        assert not getattr(model, "is_quantized", False)  # CPU: an ordinary dense model
        import tempfile
        with tempfile.TemporaryDirectory() as resaved:  # saves as a plain dense checkpoint
            model.save_pretrained(resaved)
            again = AutoModelForCausalLM.from_pretrained(resaved)
            with torch.no_grad():
                assert torch.equal(again(input_ids=ref["ids"]).logits, ref["logits"])
        print("OK")
    """, artefacts)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_4_spp_eval_and_merge_read_an_export(artefacts, tmp_path, capsys):
    from tests.helpers import cli_json

    dense = cli_json(capsys, "eval", "--model", artefacts / "merged", "--data",
                     artefacts / "text.txt", "--seqlen", "32")  # fmt: skip
    export = cli_json(capsys, "eval", "--model", artefacts / "export", "--data",
                      artefacts / "text.txt", "--seqlen", "32")  # fmt: skip
    assert export["perplexity"] == dense["perplexity"] and export["sparsity"] == 0.5
    info = cli_json(capsys, "merge", "--model", artefacts / "export", "--adapter",
                    artefacts / "peft_adapter", "--out", tmp_path / "m", "--allow-other-base")  # fmt: skip
    assert info["sparsity_preserved"] is True


def test_4_an_unregistered_transformers_stops_instead_of_loading_garbage(artefacts):
    result = run_fresh("""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained("export")
    """, artefacts, {"SPP_KERNELS_NO_HOOK": "1"})  # fmt: skip
    assert result.returncode != 0 and "no file named model.safetensors" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "foreign version", "missing meta"])
def test_4_a_corrupt_or_foreign_export_is_a_one_line_error(artefacts, tmp_path, capsys, damage):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.helpers import assert_user_error

    export = tmp_path / "export"
    shutil.copytree(artefacts / "export", export)
    tensors_file = export / "model_2to4.safetensors"
    if damage == "truncated":
        tensors_file.write_bytes(tensors_file.read_bytes()[: tensors_file.stat().st_size // 2])
        words = "model_2to4.safetensors"
    elif damage == "foreign version":
        config = json.loads((export / "config.json").read_text())
        config["quantization_config"]["format_version"] = 99
        (export / "config.json").write_text(json.dumps(config))
        words = "format_version 99 is not supported"
    else:
        with safe_open(str(tensors_file), framework="pt") as f:
            metadata = f.metadata()
            keys = [k for k in f.keys() if not k.endswith("q_proj.weight::meta")]  # noqa: SIM118
            tensors = {k: f.get_tensor(k) for k in keys}
        save_file(tensors, tensors_file, metadata=metadata)
        words = "::meta tensor"
    assert_user_error(capsys, words, "eval", "--model", export, "--data",
                      artefacts / "text.txt", "--seqlen", "32")  # fmt: skip
