"""`spp train` under torchrun, accelerate launch and DeepSpeed: 2 CPU processes (gloo) vs one.

The commands are run exactly as a user types them (the launcher's own executable, `-m
spp_kernels train`, `--spp-r`, which torchrun does not mistake for one of its options,
an accelerate config file, a DeepSpeed JSON from configs/). With dropout 0, N processes
with --batch-size B must give the adapters one process gives with --batch-size N*B over the
same steps and seed (DDP, FSDP2, ZeRO-2, ZeRO-3); a run stopped after a checkpoint resumes
to the same adapters; the saved adapter and Trainer's checkpoints load with peft.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spp_kernels.cli import main
from tests.helpers import make_cli_models

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BIN = Path(sys.executable).parent
STEPS = "4"


def launcher(name: str) -> list[str]:
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed")
    return [exe]


ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = ["--standalone", "--nproc_per_node", "2"]
ACCELERATE = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_cli_models(tmp_path_factory.mktemp("dist"))


def train_args(workdir: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["-m", "spp_kernels", "train", "--model", str(workdir / "pruned"),
            "--data", str(workdir / "text.txt"), "--max-len", "32", "--spp-r", "4",
            "--dropout", "0", "--batch-size", str(batch), "--max-steps", STEPS, "--seed", "3",
            "--save-every", "1", "--out", str(out), "--json", "--quiet", *extra]  # fmt: skip


def launch(prefix: list[str], args: list[str]) -> dict:
    """Rank 0's JSON result of a run that must exit 0 on every process (a --stop-after stop
    included: every rank leaves after rank 0 has written the checkpoint and the adapter)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout[proc.stdout.index("{") :])


@pytest.fixture(scope="module")
def single(workdir):
    """One process, batch 4."""
    out = workdir / "single"
    assert main(train_args(workdir, out, 4)[2:]) == 0
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapters(a: dict, b: dict, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for key in a:
        err = float((a[key].double() - b[key].double()).norm() / a[key].double().norm())
        assert err <= rtol, (key, err)


def test_torchrun_ddp_matches_one_process_with_twice_the_batch(workdir, single):
    info = launch([*launcher("torchrun"), *TORCHRUN], train_args(workdir, workdir / "ddp", 2))
    assert info["processes"] == 2 and info["engine"] == "DDP" and info["steps"] == int(STEPS)
    assert_same_adapters(load_file(workdir / "ddp" / "adapter_model.safetensors"), single)
    # Trainer's intermediate checkpoints hold the same kind of adapter, openable by peft.
    assert_same_adapters(load_file(workdir / "ddp" / "checkpoint-4" / "adapter_model.safetensors"),
                         single)  # fmt: skip


def test_accelerate_launch_ddp_matches_one_process(workdir, single):
    info = launch([*launcher("accelerate"), *ACCELERATE], train_args(workdir, workdir / "acc", 2))
    assert info["processes"] == 2 and info["steps"] == int(STEPS)
    assert_same_adapters(load_file(workdir / "acc" / "adapter_model.safetensors"), single)


def cpu_fsdp2_config(tmp_path: Path) -> Path:
    """configs/accelerate/fsdp2.yaml as a user adapts it to 2 CPU processes."""
    text = (ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text()
    text = text.replace("num_processes: 8", "num_processes: 2").replace(
        "use_cpu: false", "use_cpu: true")  # fmt: skip
    path = tmp_path / "fsdp2.yaml"
    path.write_text(text)
    return path


def test_accelerate_fsdp2_config_run_stopped_and_resumed_matches_one_process(
    workdir, single, tmp_path
):
    """accelerate launch --config_file fsdp2.yaml (FSDP2 shards on CPU processes too),
    stopped after a checkpoint, resumed under torchrun --fsdp: the same adapters as one
    process; the result loads with peft."""
    out = workdir / "fsdp"
    config = ["launch", "--config_file", str(cpu_fsdp2_config(tmp_path))]
    stopped = launch([*launcher("accelerate"), *config],
                     train_args(workdir, out, 2, "--stop-after", "2"))  # fmt: skip
    assert stopped["interrupted"] is True and stopped["steps"] == 2
    assert stopped["processes"] == 2 and stopped["engine"] == "FSDP2"  # not DDP in disguise
    resumed = launch([*launcher("torchrun"), *TORCHRUN],
                     train_args(workdir, out, 2, "--fsdp", "--resume"))  # fmt: skip
    assert resumed["steps"] == int(STEPS) and resumed["engine"] == "FSDP2"
    assert_same_adapters(load_file(out / "adapter_model.safetensors"), single)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "pruned"), out)
    saved = load_file(out / "adapter_model.safetensors")
    state = model.state_dict()
    for key, value in saved.items():
        live = key.replace(".spp_alpha", ".spp_alpha.default").replace(
            ".spp_beta", ".spp_beta.default"
        )
        assert torch.equal(state[live], value), key


def test_a_two_process_run_resumes_on_one_process_with_the_global_batch(workdir, single):
    """A 2-process run (--batch-size 2, global batch 4) stopped after a checkpoint resumes
    on 1 process: the global batch is kept (4 per process), giving one process's adapters."""
    out = workdir / "resume-on-1"
    stopped = launch([*launcher("torchrun"), *TORCHRUN],
                     train_args(workdir, out, 2, "--stop-after", "2"))  # fmt: skip
    assert stopped["interrupted"] is True and stopped["steps"] == 2
    resumed = launch([*launcher("torchrun"), "--standalone", "--nproc_per_node", "1"],
                     train_args(workdir, out, 2, "--resume"))  # fmt: skip
    assert resumed["processes"] == 1 and resumed["steps"] == int(STEPS)
    assert_same_adapters(load_file(out / "adapter_model.safetensors"), single)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(workdir, single, stage, tmp_path):
    """torchrun ... --deepspeed configs/deepspeed/zero{2,3}.json (the shipped files)."""
    pytest.importorskip("deepspeed")
    out = workdir / f"zero{stage}"
    config = ROOT / "configs" / "deepspeed" / f"zero{stage}.json"
    if stage == 3:  # partition every parameter, as real layers are (above DeepSpeed's
        # default persistence threshold of 1e5 elements): the adapters must be gathered
        ds = json.loads(config.read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        config = tmp_path / "zero3.json"
        config.write_text(json.dumps(ds))
    info = launch([*launcher("torchrun"), *TORCHRUN],
                  train_args(workdir, out, 2, "--deepspeed", str(config)))  # fmt: skip
    assert info["processes"] == 2 and info["engine"] == f"DeepSpeed ZeRO-{stage}"
    assert_same_adapters(load_file(out / "adapter_model.safetensors"), single)
    assert_same_adapters(load_file(out / "checkpoint-4" / "adapter_model.safetensors"), single)
