"""`spp train`: SPP adapters on a pruned model with transformers' Trainer, resumable.

One process: `spp train ...`. Several: `torchrun --nproc_per_node N -m spp_kernels train ...`
or `accelerate launch [--config_file cfg.yaml] -m spp_kernels train ...` (DDP by default,
FSDP2 with --fsdp or an accelerate FSDP config, DeepSpeed with --deepspeed; see
spp_kernels.training.train). Every process loads the model and the data; rank 0 owns --out
(its lock, Trainer's checkpoint-N directories, the final adapter) and prints the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .inputs import WIKIPEDIA, wikipedia, window_length
from .models import bnb_config, load_model, resolve_device, target_linears
from .outdir import owned_output
from .output import UserError, emit, first_line, format_table
from .parser import ADAPTER_OPTIONS, TRAIN_OPTIONS

log = logging.getLogger(__name__)
DEFAULT_MAX_LEN = 512


def _config(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """factory(**kwargs), with its ValueError (a bad option value) as a UserError."""
    try:
        return factory(**kwargs)
    except ValueError as e:
        raise UserError(first_line(e)) from None


# Options copied by name into SPPConfig / TrainConfig (argparse dest == field name; the
# parser generates them from the same fields).
SPP_FIELDS = ADAPTER_OPTIONS
TRAIN_FIELDS = (*TRAIN_OPTIONS, "seed")


def _spp_config_from_args(args: argparse.Namespace) -> Any:
    from ..adapters import SPPConfig

    if args.scale == 0:
        log.warning("--scale 0: the adapter term is multiplied by 0, training changes nothing")
    adapter_dtype = "float32" if args.bf16 else None
    return _config(
        SPPConfig, adapter_dtype=adapter_dtype, **{f: getattr(args, f) for f in SPP_FIELDS}
    )


def _train_config_from_args(args: argparse.Namespace) -> Any:
    from ..training.config import TrainConfig

    return _config(TrainConfig, **{f: getattr(args, f) for f in TRAIN_FIELDS})


@contextlib.contextmanager
def _owned_output(args: argparse.Namespace, is_main: bool) -> Iterator[Path]:
    """Rank 0 holds the lock on --out for the whole run and checks --out under it; other
    ranks only use it. Nothing in --out changes here (see `_start_fresh`)."""
    from ..training.checkpoints import has_checkpoint, legacy_message, legacy_run

    out = Path(args.out)
    if not is_main:
        yield out
        return
    data = None if args.data == WIKIPEDIA else args.data
    inputs = {"--model": args.model, "--data": data, "--teacher": args.teacher,
              "--deepspeed": args.deepspeed}  # fmt: skip
    with owned_output(out, args.force or args.resume, inputs):
        if args.resume and (legacy := legacy_run(out)) is not None:
            raise UserError(legacy_message(legacy))
        if args.resume and not has_checkpoint(out):
            raise UserError(f"--resume: no checkpoint-N directory in {out}")
        yield out


def _start_fresh(out: Path) -> None:
    """--force, once the model and data are loaded and checked: a fresh run must never
    resume from, or leave behind, an older run's checkpoints and adapter files."""
    from ..adapters.config import ADAPTER_CONFIG_NAME, LEGACY_CONFIG_NAME
    from ..training.checkpoints import LEGACY_ROOT, UNUSABLE_PREFIX, checkpoint_dirs

    old = [*checkpoint_dirs(out), out / LEGACY_ROOT, out / "runs"]
    old += [p for p in out.iterdir() if p.name.startswith(UNUSABLE_PREFIX + "checkpoint-")]
    for path in old:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    for name in (ADAPTER_CONFIG_NAME, LEGACY_CONFIG_NAME, "adapter_model.safetensors"):
        (out / name).unlink(missing_ok=True)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ..adapters import get_spp_model
    from ..training.checkpoints import CheckpointError
    from ..training.data import check_vocab, file_digest
    from ..training.train import NonFiniteError, launched, train

    spp_config = _spp_config_from_args(args)
    config = _train_config_from_args(args)
    deepspeed = _deepspeed_config(args.deepspeed)
    if deepspeed is not None and config.skip_nonfinite:
        raise UserError("--skip-nonfinite needs a skippable optimizer step; DeepSpeed steps "
                        "inside backward: leave it at 0 with --deepspeed")  # fmt: skip
    world, rank = launched()
    is_main = rank == 0
    if args.fsdp and world == 1:
        raise UserError("--fsdp needs several processes: launch with torchrun or accelerate")
    device = _process_device(args.device, world)
    bits = 4 if args.load_in_4bit else 8 if args.load_in_8bit else None
    if args.quant_type is not None and bits != 4:
        raise UserError("--quant-type chooses the 4-bit data type: it needs --load-in-4bit")
    if bits and (args.fsdp or deepspeed is not None):
        raise UserError(f"--load-in-{bits}bit trains on one process per GPU (DDP); it does not "
                        "combine with --fsdp or --deepspeed")  # fmt: skip
    codes = _stored_low_bit(args.model)
    low_bit = "--weight-dtype" if args.weight_dtype is not None else codes
    if low_bit and bits:
        raise UserError(f"{low_bit}: the N:M values are low-bit codes; the base cannot also be "
                        f"quantized by --load-in-{bits}bit: choose one")  # fmt: skip
    if low_bit and (args.fsdp or deepspeed is not None):
        raise UserError(f"{low_bit}: low-bit N:M codes train on one process per GPU (DDP); "
                        "they do not combine with --fsdp or --deepspeed")  # fmt: skip
    if not is_main:
        args.quiet = True  # logs and progress bars on rank 0 only
        logging.getLogger("spp_kernels").setLevel(logging.WARNING)
    with _owned_output(args, is_main) as out:
        _wait_for_rank_0(world)  # other ranks start once rank 0 holds --out
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        quantization = bnb_config(bits, dtype, args.quant_type or "nf4")
        model, tokenizer = load_model(args.model, dtype=dtype, device=str(device),
                                      quantization=quantization)  # fmt: skip
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            # peft's preparation (QLoRA's): the parameters that are not quantized (norms,
            # embeddings, lm_head) in float32; checkpointing (and with it inputs that require
            # grad) is --gradient-checkpointing's choice, made by train()
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        args.max_len = window_length(model, args.max_len, DEFAULT_MAX_LEN, "--max-len")
        examples, data_digest = load_training_data(args, tokenizer)
        check_vocab(examples, model.config.vocab_size, str(args.data))
        teacher = None
        if args.teacher is not None:
            teacher, _ = load_model(args.teacher, dtype=dtype, device=str(device))
            if teacher.config.vocab_size != model.config.vocab_size:
                raise UserError(
                    f"--teacher {args.teacher}: vocabulary {teacher.config.vocab_size} differs "
                    f"from the model's {model.config.vocab_size}"
                )
        if is_main:  # everything is checked: now --out may change
            if args.force and not args.resume:
                _start_fresh(out)
            out.mkdir(exist_ok=True)
        masks = _zero_masks(model)
        torch.manual_seed(args.seed)
        spp = get_spp_model(model, spp_config)
        count = spp.trainable_parameters()
        log.info(
            "SPP adapters: %s trainable of %s parameters (%.3f%%) on %d process(es)%s",
            f"{count.trainable:,d}", f"{count.total:,d}", count.percent, world,
            ", FSDP2" if args.fsdp else ", DeepSpeed" if deepspeed else "",
        )  # fmt: skip
        # The backend computes the same math: it may change between a run and its resumption.
        spp_dict = {k: v for k, v in spp_config.to_dict().items() if k != "backend"}
        fingerprint = {
            "data_sha256": data_digest or file_digest(args.data),
            "max_len": args.max_len,
            "mask_prompt": args.mask_prompt,
            "spp_config": _jsonable(spp_dict),
            "teacher": args.teacher is not None,
        }
        try:
            result = train(
                spp, examples, config, out, teacher=teacher, resume=args.resume,
                pad_id=pad_id(tokenizer), fingerprint=fingerprint, progress=not args.quiet,
                deepspeed=deepspeed, fsdp=args.fsdp,
                gradient_checkpointing=args.gradient_checkpointing,
            )  # fmt: skip
        except CheckpointError as e:
            raise UserError(f"{first_line(e)} (use the original options)") from None
        except NonFiniteError as e:
            raise UserError(str(e)) from None
        _check_zeros_kept(model, masks)
        spp.save_pretrained(out)  # gathers FSDP2 / ZeRO-3 shards on every rank; rank 0 writes
        # No rank may exit before rank 0 has written: a launcher stops the other processes
        # as soon as one exits with a non-zero status (a signalled run exits 128 + signal).
        _barrier()
    if not is_main:
        return exit_status(result)
    info = {
        "steps": result.step,
        "total_steps": result.total_steps,
        "final_loss": result.final_loss,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "interrupted": result.interrupted,
        "stop_signal": result.stop_signal,
        "skipped_nonfinite_steps": result.skipped_nonfinite,
        "trainable_params": count.trainable,
        "examples": len(examples),
        "processes": world,
        "fsdp": args.fsdp,
        "deepspeed": args.deepspeed,
        "engine": result.engine,
        "base_quantization": _quantization_name(args, model),
        "adapter": str(out),
    }
    rows = [
        ["steps", f"{result.step} / {result.total_steps}"],
        ["final loss", result.final_loss],
        ["tokens", result.tokens],
        ["seconds (this run)", f"{result.seconds:.1f}"],
        ["trainable params", count.trainable],
        ["processes", f"{world} ({result.engine})"],
        ["adapter saved to", str(out)],
    ]
    if result.interrupted:
        rows.append(["stopped early", "resume with --resume"])
    unusable = None if result.interrupted else result.unusable
    info["unusable"] = unusable
    emit(args, info, format_table(rows, ["train", "value"]))
    if unusable:
        raise UserError(
            f"{unusable}: the adapter in {out} holds the last finite update, not a trained "
            "run; lower --lr and train again"
        )
    return exit_status(result)


def _process_device(requested: str, world: int) -> Any:
    """--device without a launcher; under one, each process's device as Trainer picks it
    (cuda:LOCAL_RANK, or the CPU)."""
    import os

    import torch

    if world == 1:
        return resolve_device(requested)
    if torch.cuda.is_available():
        if requested not in ("auto", "cuda"):
            log.warning("--device %s is ignored under a launcher: each process uses the GPU "
                        "of its LOCAL_RANK", requested)  # fmt: skip
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _wait_for_rank_0(world: int) -> None:
    """Ranks > 0 wait until rank 0 holds --out (the process group is Trainer's: it is set up
    here from the launcher's environment, as Trainer would)."""
    if world > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _deepspeed_config(path: str | None) -> str | None:
    """--deepspeed: a readable JSON object (checked before anything changes), passed on."""
    if path is None:
        return None
    import json

    p = Path(path)
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--deepspeed {p}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise UserError(f"--deepspeed {p}: expected a JSON object")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("--deepspeed needs the deepspeed package (pip install deepspeed)")
    return str(p)


def _zero_masks(model: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, digest of its zero mask)} of the targeted layers, before SPP: a 32-byte
    digest per layer instead of a mask (a 70B's masks would be 64 GB), and no reference to
    the layer (SPP may replace it by a packed or quantized one: the old weights must go).
    For a bitsandbytes layer, or one with low-bit N:M codes (`spp quantize`), the digest is
    of its codes: the check then says the frozen codes are unchanged, which keeps the
    zeros they decode to."""
    out = {}
    for name, layer in target_linears(model).items():
        frozen = _frozen_tensor(layer)
        out[name] = (tuple(frozen.shape), _zeros_digest(frozen))
    return out


def _frozen_tensor(layer: Any) -> Any:
    """The tensor holding a layer's frozen weight: its weight, or its low-bit codes (None
    for a packed layer, whose values are not the dense weight)."""
    if getattr(layer, "weight", None) is not None:
        return layer.weight
    return getattr(layer, "weight_codes", None)


def _zeros_digest(weight: Any) -> str:
    """sha256 of the bit-packed mask of exact zeros (transient: one layer's mask)."""
    import hashlib

    import numpy as np

    zeros = (weight.detach() == 0).cpu().numpy()
    return hashlib.sha256(np.packbits(zeros).tobytes()).hexdigest()


def _check_zeros_kept(model: Any, masks: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Sparsity check after training: the zero mask of every frozen weight of `model` (the
    SPP-wrapped model's base) is unchanged (bitwise, by digest). FSDP2 shards are gathered
    (every rank calls this, in the same order); a layer whose dense weight is no longer
    held (packed N:M, quantized into N:M codes while wrapping, DeepSpeed ZeRO-3 partitions)
    keeps its zeros by construction."""
    for name, (shape, digest) in masks.items():
        layer = model.get_submodule(name)
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = _frozen_tensor(layer)
        if weight is None:
            continue
        weight = weight.detach()
        full = getattr(weight, "full_tensor", None)
        weight = full() if callable(full) else weight
        if tuple(weight.shape) != shape:
            continue
        if _zeros_digest(weight) != digest:
            raise UserError(f"training changed the zeros of {name}: sparsity was lost")


def _stored_low_bit(model: str) -> str | None:
    """'--model X (spp quantize)' when the model directory's config.json names the low-bit
    N:M format (read as JSON, nothing loaded), else None."""
    from ..sparsity.lowbit import stored_value_format

    path = Path(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not a directory, or its config: load_model names the problem
    if stored_value_format(config) is not None:
        return f"--model {model} (spp quantize)"
    return None


def _quantization_name(args: argparse.Namespace, model: Any = None) -> str | None:
    """The frozen base's quantized format in the result: bitsandbytes' ('nf4', 'fp4',
    'int8'), low-bit N:M values ('nm-int8', 'nm-fp8', 'nm-int4': --weight-dtype, or a base
    written by `spp quantize`), or None."""
    from ..sparsity.lowbit import stored_value_format

    stored = stored_value_format(getattr(model, "config", None))
    if stored is not None or args.weight_dtype is not None:
        return f"nm-{stored or args.weight_dtype}"
    if args.load_in_4bit:
        return args.quant_type or "nf4"
    return "int8" if args.load_in_8bit else None


def exit_status(result: Any) -> int:
    """128 + the signal that stopped the run (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1); 0 when
    it finished or stopped where --stop-after asked (the JSON's "interrupted" says so)."""
    return 128 + result.stop_signal if result.stop_signal else 0


def load_training_data(args: argparse.Namespace, tokenizer: Any) -> tuple[list[Any], str | None]:
    """(examples, digest): --data wikipedia gives --max-len windows of the Wikipedia train
    split (digest = the corpus id: the split is fixed); a path gives load_dataset's examples
    (digest None: the caller hashes the file)."""
    from ..training.data import Example, load_dataset

    if args.data == WIKIPEDIA:
        from ..datasets import CORPUS_ID

        windows = wikipedia("--data", tokenizer, "train", seqlen=args.max_len)
        examples = [Example(tuple(row), tuple(row)) for row in windows.tolist()]
        return examples, f"{CORPUS_ID}:train:{args.max_len}"
    examples = load_dataset(
        args.data, tokenizer, max_len=args.max_len, mask_prompt=args.mask_prompt
    )
    return examples, None


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
