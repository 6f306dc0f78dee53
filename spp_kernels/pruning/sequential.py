"""prune(): magnitude, Wanda or SparseGPT over a model's decoder blocks, one block at a time.

Order of work (as in the Wanda and SparseGPT reference code):
1. validate everything (method, sparsity, decoder blocks, every target's shape against
   N:M, calibration ids) before any weight is touched;
2. calibration methods: capture the hidden states entering block 0 and every block's
   call kwargs (see calibration.py);
3. per block: run the dense block on its inputs while hooks accumulate each linear
   layer's input statistics (Wanda: per-channel squared norms; SparseGPT: Hessian),
   compute every pruned weight of the block in float32, commit them together, then run
   the pruned block to produce the next block's inputs.
A block is either fully pruned or untouched. If a later block fails (e.g. out of memory),
the error says which blocks were already pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..sparsity.report import SparsityReport, sparsity_report
from ..utils.hf import check_finite_parameters, find_decoder_layers
from .calibration import (
    calibration_samples,
    capture_block_inputs,
    linear_targets,
    run_block,
)
from .dsnot import SKIP, InputMoments, dsnot_prune_weight
from .magnitude import magnitude_prune_weight
from .masks import Sparsity, kept_per_row, parse_sparsity, sparsity_name
from .sparsegpt import BLOCKSIZE, MASKS, HessianAccumulator, sparsegpt_prune_weight
from .wanda import InputNorms, wanda_prune_weight

METHODS = ("magnitude", "wanda", "sparsegpt")
REFINEMENTS = ("dsnot",)  # applied after the method's mask (DSnoT: after Wanda)


def _validate_targets(
    layers: nn.ModuleList, sparsity: Sparsity, method: str
) -> list[dict[str, nn.Linear]]:
    if method == "sparsegpt" and isinstance(sparsity, tuple) and BLOCKSIZE % sparsity[1]:
        raise ValueError(
            f"SparseGPT {sparsity_name(sparsity)} needs M={sparsity[1]} to divide its "
            f"blocksize {BLOCKSIZE}"
        )
    targets = [linear_targets(block) for block in layers]
    for i, block_targets in enumerate(targets):
        if not block_targets:
            raise ValueError(f"decoder layer {i} has no nn.Linear layers to prune")
        for name, linear in block_targets.items():
            if not linear.weight.is_floating_point():
                raise TypeError(
                    f"layer {i}.{name}: cannot prune a {linear.weight.dtype} weight "
                    "(quantized weights are not supported; load the model in bf16/fp16/fp32)"
                )
            if linear.weight.device.type == "meta":
                raise ValueError(f"layer {i}.{name}: weight is on the meta device")
            if not isinstance(sparsity, tuple) and kept_per_row(linear.in_features, sparsity) < 1:
                raise ValueError(
                    f"sparsity {sparsity} leaves no weight in the rows of layer {i}.{name} "
                    f"({linear.in_features} inputs keep round((1 - s) * n) = 0); use a lower "
                    "sparsity"
                )
            if isinstance(sparsity, tuple) and linear.in_features % sparsity[1]:
                raise ValueError(
                    f"{sparsity_name(sparsity)} sparsity needs M={sparsity[1]} to divide the "
                    f"input dimension, but layer {i}.{name} has in_features="
                    f"{linear.in_features}"
                )
    return targets


def _stats_factory(method: str) -> Callable[[nn.Linear], InputNorms | HessianAccumulator]:
    if method == "wanda+dsnot":
        return lambda lin: InputMoments(lin.in_features, lin.weight.device)
    if method == "wanda":
        return lambda lin: InputNorms(lin.in_features, lin.weight.device)
    # float32 statistics whatever the model dtype; float64 models keep float64
    return lambda lin: HessianAccumulator(
        lin.in_features,
        lin.weight.device,
        torch.float64 if lin.weight.dtype == torch.float64 else torch.float32,
    )


def _pruned_weight(
    method: str,
    linear: nn.Linear,
    stats,
    sparsity: Sparsity,
    sparsegpt_mask: str = "block",
    name: str = "",
) -> torch.Tensor:
    if method == "wanda+dsnot":
        refine = name.split(".")[0] not in SKIP
        return dsnot_prune_weight(linear.weight, stats, sparsity, refine=refine)
    if method == "magnitude":
        return magnitude_prune_weight(linear.weight, sparsity)
    if method == "wanda":
        return wanda_prune_weight(linear.weight, stats.sq_norms, sparsity)
    return sparsegpt_prune_weight(linear.weight, stats.hessian, sparsity, mask=sparsegpt_mask)


def _collect_stats(method, block, targets, inputs, index) -> dict:
    """Run the dense block on every sample, accumulating its linear layers' input stats."""
    factory = _stats_factory(method)
    stats = {name: factory(linear) for name, linear in targets.items()}
    handles = [
        linear.register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0]))
        for name, linear in targets.items()
    ]
    try:
        for h in inputs.hidden:
            run_block(block, h, inputs.extra_args[index], inputs.kwargs[index])
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str,
    sparsity: float | str | tuple[int, int],
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    nsamples: int = 128,
    seqlen: int | None = None,
    progress: bool = True,
    sparsegpt_mask: str = "block",
    refine: str | None = None,
) -> SparsityReport:
    """Prune the nn.Linear layers inside a causal LM's decoder blocks, in place.

    Args:
        model: a Hugging Face causal LM (LlamaForCausalLM, MistralForCausalLM,
            Qwen2ForCausalLM, or any model whose decoder blocks `find_decoder_layers`
            finds). Embeddings and lm_head are never pruned.
        method: "magnitude" (|W|), "wanda" (|W| * ||X_i||_2) or "sparsegpt" (OBS updates).
        sparsity: a fraction in (0, 1) (every output row keeps round((1 - s) * n) weights)
            or "N:M" (N kept in every M consecutive inputs), e.g. 0.5 or "2:4".
        calibration: token ids for "wanda" and "sparsegpt" (ignored by "magnitude"): a
            LongTensor (rows, length), a 1-D token stream, or an iterable of them.
        nsamples: calibration samples used (the first nsamples rows).
        seqlen: tokens per sample (None: the calibration rows' length).
        progress: show a tqdm bar over decoder layers.
        sparsegpt_mask: SparseGPT's unstructured mask: "block" (the reference's one
            threshold per 128-column block over all rows) or "row" (exact count per row).
        refine: None, or "dsnot" (with method "wanda"): DSnoT's training-free mask
            refinement (pruning/dsnot.py) on the attention projections; the MLP layers
            keep the Wanda mask, as in the authors' default.

    Returns the `sparsity_report` of the pruned model.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if refine is not None and refine not in REFINEMENTS:
        raise ValueError(f"refine must be None or one of {REFINEMENTS}, got {refine!r}")
    if refine == "dsnot" and method != "wanda":
        raise ValueError(f"refine='dsnot' refines a Wanda mask: use method='wanda', not {method!r}")
    label = method
    if refine == "dsnot":
        method = "wanda+dsnot"
    target = parse_sparsity(sparsity)
    if sparsegpt_mask not in MASKS:
        raise ValueError(f"sparsegpt_mask must be one of {MASKS}, got {sparsegpt_mask!r}")
    _, layers = find_decoder_layers(model)
    targets = _validate_targets(layers, target, method)
    check_finite_parameters(model, "prune")
    calibrated = method != "magnitude"
    samples = calibration_samples(calibration, nsamples, seqlen, model) if calibrated else None

    was_training = model.training
    model.eval()
    done = 0
    bar = tqdm(
        total=len(layers),
        desc=f"{label} {sparsity_name(target)}",
        unit="layer",
        disable=not progress,
    )
    try:
        inputs = capture_block_inputs(model, layers, samples) if calibrated else None
        for i, block in enumerate(layers):
            stats = _collect_stats(method, block, targets[i], inputs, i) if calibrated else {}
            new = {
                name: _pruned_weight(method, linear, stats.get(name), target, sparsegpt_mask, name)
                for name, linear in targets[i].items()
            }
            for name, linear in targets[i].items():
                linear.weight.copy_(new[name])
            done = i + 1
            del new, stats
            if calibrated and i + 1 < len(layers):
                for j, h in enumerate(inputs.hidden):
                    inputs.hidden[j] = run_block(block, h, inputs.extra_args[i], inputs.kwargs[i])
            bar.update(1)
    except Exception as exc:
        if done:
            raise RuntimeError(
                f"pruning stopped in decoder layer {done} of {len(layers)} ({exc!r}); "
                f"layers 0..{done - 1} are already pruned, the rest are not: reload the "
                "model before retrying"
            ) from exc
        raise
    finally:
        bar.close()
        model.train(was_training)
    return sparsity_report(model)
