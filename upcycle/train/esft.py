"""Expert-specialised fine-tuning (ESFT, Wang et al. 2024): choose the experts a task uses, train only them.

    stats = route_sample(model, sequences, micro_batch_size=4, pad_id=0, device="cpu")
    choice = choose_experts(stats, cfg.experts_subset)          # {"model.layers.24.mlp.experts": [3, 17], ...}
    print(format_choice(choice, stats, cfg.experts_subset))
    restrict_training(model, choice, cfg.experts_subset, lora=False)

``route_sample`` runs the model (eval mode, no gradients) over a sample of the training
sequences and sums, per MoE layer and expert, the routed combine weight (``load``) and the
routed tokens (``tokens``) of the real tokens. ``choose_experts`` keeps, per layer, the
smallest set of experts whose share reaches ``coverage`` (ranked by the share; ties to the
lower id), or the ``top`` N. ``restrict_training`` makes only those train: with LoRA the
other experts' adapters are dropped (``LoraExperts.keep_experts``); in full fine-tuning the
layer's experts become a ``SubsetExperts`` (chosen ones trainable, the rest frozen) and
everything else is frozen but what the config asks for (routers, attention).
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.moe.block import moe_blocks

__all__ = ["choose_experts", "format_choice", "restrict_training", "route_sample"]


def _experts_name(block_name: str) -> str:
    return f"{block_name}.experts"


@torch.no_grad()
def route_sample(model: nn.Module, sequences: list[dict], *, micro_batch_size: int, pad_id: int, device,
                 autocast=None) -> dict[str, dict[str, list[float]]]:
    """Per experts module: ``{"load": [E], "tokens": [E], "routed_tokens": n}`` over ``sequences`` (dicts
    with ``input_ids``, as the training set holds them), padding excluded."""
    from upcycle.data import collate

    blocks = moe_blocks(model)
    if not blocks:
        raise UpcycleError("experts_subset needs a model with MoE layers; this one has none")
    sums = {name: torch.zeros(2, b.cfg.num_experts, dtype=torch.float64) for name, b in blocks.items()}

    def hook(name):
        def record(module, args, kwargs):
            _, _, expert_idx_A, weight_A = args[:4]
            E = sums[name].shape[1]
            e = expert_idx_A.detach().to("cpu")
            sums[name][0] += torch.zeros(E, dtype=torch.float64).index_add_(0, e, weight_A.detach().double().cpu())
            sums[name][1] += torch.bincount(e, minlength=E).double()
        return record

    handles = [b.experts.register_forward_pre_hook(hook(n), with_kwargs=True) for n, b in blocks.items()]
    was_training = model.training
    model.eval()
    ctx = autocast or (lambda: torch.autocast("cpu", enabled=False))
    try:
        for i in range(0, len(sequences), micro_batch_size):
            rows = [{"input_ids": ex["input_ids"], "labels": ex["input_ids"]} for ex in sequences[i:i + micro_batch_size]]
            batch = collate(rows, pad_id=pad_id)
            with ctx():
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {_experts_name(n): {"load": s[0].tolist(), "tokens": s[1].tolist()} for n, s in sums.items()}


def choose_experts(stats: dict, cfg) -> dict[str, list[int]]:
    """Per experts module, the chosen expert ids (ascending); ``cfg``: an ``ExpertsSubsetConfig``."""
    choice = {}
    for name, s in stats.items():
        score = s[cfg.by]
        order = sorted(range(len(score)), key=lambda e: (-score[e], e))
        if cfg.top is not None:
            keep = order[:min(cfg.top, len(order))]
        else:
            total, acc, keep = sum(score), 0.0, []
            for e in order:
                # An expert that received nothing never helps (and rounding must not pull it in at coverage 1).
                if score[e] <= 0 or acc >= cfg.coverage * total:
                    break
                keep.append(e)
                acc += score[e]
        choice[name] = sorted(keep)
    return choice


def format_choice(choice: dict, stats: dict, cfg, sequences: int) -> str:
    """The choice as a table (what the trainer prints and ``experts_subset.json`` records)."""
    rule = f"coverage {cfg.coverage:g}" if cfg.top is None else f"top {cfg.top}"
    lines = [f"experts subset (ESFT): by {cfg.by}, {rule}, from {sequences} training sequences routed",
             f"| MoE layer | trained | of | share of {cfg.by} | experts |", "|---|---:|---:|---:|---|"]
    for name, ids in choice.items():
        score = stats[name][cfg.by]
        total = sum(score)
        share = sum(score[e] for e in ids) / total if total else 0.0
        lines.append(f"| {name.removesuffix('.experts')} | {len(ids)} | {len(score)} | {share:.3f} | "
                     f"{' '.join(map(str, ids)) or '-'} |")
    n, E = sum(map(len, choice.values())), sum(len(s[cfg.by]) for s in stats.values())
    lines.append(f"trained experts: {n} of {E} ({100 * n / max(E, 1):.1f}%)")
    return "\n".join(lines)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from upcycle.train.model import decoder_layers

    found = [c for layer in decoder_layers(model) for c in layer.children() if "attention" in type(c).__name__.lower()]
    if not found:
        raise UpcycleError("experts_subset.train_attention: cannot find the attention modules of this model")
    return found


def restrict_training(model: nn.Module, choice: dict[str, list[int]], cfg, *, lora: bool) -> None:
    """Train only the chosen experts (see the module docstring); in place."""
    from upcycle.adapters.lora import LoraExperts
    from upcycle.moe.subset import SubsetExperts

    blocks = {_experts_name(n): b for n, b in moe_blocks(model).items()}
    unknown = sorted(set(choice) - set(blocks))
    if unknown:
        raise UpcycleError(f"the experts subset names {unknown[0]}, which is no MoE layer of this model")
    if lora:
        for name, ids in choice.items():
            experts = blocks[name].experts
            if not isinstance(experts, LoraExperts):
                raise UpcycleError(f"experts_subset with lora: {name} has no expert adapter (lora.experts: true)")
            experts.keep_experts(ids)
        return
    model.requires_grad_(False)
    for name, ids in choice.items():
        block = blocks[name]
        block.experts = SubsetExperts.from_experts(block.experts, ids)
        if cfg.train_router:
            block.router.requires_grad_(True)
    if cfg.train_attention:
        for m in _attention_modules(model):
            m.requires_grad_(True)
