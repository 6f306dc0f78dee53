"""Issue 20 item 5: one default per hyper-parameter. `spp train`'s options are generated from
the dataclass fields (AdapterOptions / SPPConfig, TrainConfig), so a default changed in one
place is the CLI's default too, and parsing arguments imports no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from spp_kernels.cli.parser import ADAPTER_OPTIONS, TRAIN_OPTIONS, build_parser

REQUIRED = ["train", "--model", "m", "--data", "d", "--out", "o"]


def test_train_options_default_to_the_config_fields():
    from spp_kernels.adapters import SPPConfig
    from spp_kernels.training.config import TrainConfig

    args = build_parser().parse_args(REQUIRED)
    spp, train = SPPConfig(), TrainConfig()
    for name in ADAPTER_OPTIONS:
        assert getattr(args, name) == getattr(spp, name), name
    for name in TRAIN_OPTIONS:
        assert getattr(args, name) == getattr(train, name), name
    # Every TrainConfig field is an option except those the CLI sets another way.
    options = {f.name for f in dataclasses.fields(TrainConfig)} - set(TRAIN_OPTIONS)
    assert options == {"max_grad_norm", "seed"}


def test_generated_options_parse_types_bounds_and_aliases():
    parser = build_parser()
    args = parser.parse_args([*REQUIRED, "--r", "8", "--lr", "1e-3", "--skip-nonfinite", "0",
                              "--group-by-length", "--weight-format", "nm"])  # fmt: skip
    assert (args.r, args.lr, args.skip_nonfinite, args.group_by_length) == (8, 1e-3, 0, True)
    assert args.weight_format == "nm"
    assert parser.parse_args([*REQUIRED, "--spp-r", "4"]).r == 4


def test_bad_values_are_argument_errors(capsys):
    import pytest

    for bad in (["--epochs", "0"], ["--skip-nonfinite", "-1"], ["--weight-format", "x"],
                ["--lr", "fast"]):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([*REQUIRED, *bad])
        assert stop.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_parsing_imports_no_torch():
    code = (
        "import sys\n"
        "from spp_kernels.cli.parser import build_parser\n"
        f"build_parser().parse_args({REQUIRED!r})\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
