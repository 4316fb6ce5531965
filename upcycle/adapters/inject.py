"""Put LoRA on a model, like PEFT's ``get_peft_model``, and take it off again.

    model = upcycle.load("runs/smollm2-moe")
    apply_lora(model, LoraConfig(r=8, alpha=16))      # q/k/v/o + every MoE layer's experts (and shared expert)
    print(trainable_summary(model))
    ...train...
    merge_and_unload(model)                           # plain model again, updates merged in

Everything except the adapters (and the routers, with ``train_router``) is frozen.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from upcycle.adapters.config import LoraConfig
from upcycle.adapters.lora import LoraExperts, LoraLinear
from upcycle.adapters.shared import format_shared_base_report, share_experts, shared_base_report, unshare_experts
from upcycle.errors import UpcycleError
from upcycle.moe.block import MoEBlock
from upcycle.moe.experts import ExpertsBase

CONFIG_ATTR = "upcycle_lora_config"  # the LoraConfig of an applied adapter, kept on the model

# Module types LoRA can wrap, and the wrapper each gets. Others (a quantised Linear, say)
# can register theirs: ``LORA_WRAPPERS[MyLinear4bit] = MyLoraLinear4bit``.
LORA_WRAPPERS: dict[type, type] = {nn.Linear: LoraLinear}


def _matcher(pattern: str):
    if any(c in pattern for c in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return lambda name: name == pattern or name.endswith("." + pattern)


def match_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Qualified names of the modules ``target_modules`` selects (each list entry must select one)."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str):
        found = [n for n in names if re.fullmatch(target_modules, n)]
        if not found:
            raise UpcycleError(f"LoRA target regex {target_modules!r} matches no module; {_hint(model)}")
        return found
    found: list[str] = []
    for p in target_modules:
        hits = [n for n in names if _matcher(p)(n)]
        if not hits:
            raise UpcycleError(f"LoRA target {p!r} matches no module; {_hint(model)}")
        found += [n for n in hits if n not in found]
    return found


def _hint(model: nn.Module) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return f"Linear layers here: {', '.join(leaves)}"


def _check_target(model: nn.Module, name: str, module: nn.Module) -> None:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    if isinstance(module, (LoraLinear, LoraExperts)):
        raise UpcycleError(f"{name} already has LoRA: apply one adapter per model")
    if isinstance(module, (ExpertsBase, MoEBlock)):
        raise UpcycleError(f"LoRA target {name} is an MoE {type(module).__name__}: use LoraConfig(experts=True) "
                           "for expert LoRA, not target_modules")
    if isinstance(parent, MoEBlock) and module is parent.router:
        raise UpcycleError(f"LoRA target {name} is an MoE router, which the block reads as a raw weight: "
                           "use LoraConfig(train_router=True) to train it")
    if not any(isinstance(module, t) for t in LORA_WRAPPERS):
        raise UpcycleError(f"LoRA target {name} is a {type(module).__name__}; LoRA supports "
                           f"{', '.join(t.__name__ for t in LORA_WRAPPERS)} (pick narrower target_modules)")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, cfg: LoraConfig | None = None) -> nn.Module:
    """Freeze ``model`` and add LoRA where ``cfg`` says, in place; returns ``model``.

    Raises UpcycleError (before changing anything) when a target pattern matches nothing,
    matches a module LoRA cannot wrap, when ``experts`` / ``train_router`` is asked of a
    model without MoE layers, or when nothing would be trainable.
    """
    cfg = cfg or LoraConfig()
    cfg.validate()
    if hasattr(model, CONFIG_ATTR):
        raise UpcycleError("the model already has a LoRA adapter: apply one adapter per model")
    targets = match_modules(model, cfg.target_modules) if cfg.target_modules else []
    modules = dict(model.named_modules())
    for name in targets:
        _check_target(model, name, modules[name])
    blocks = {n: m for n, m in modules.items() if isinstance(m, MoEBlock)}
    if (cfg.experts or cfg.train_router) and not blocks:
        what = "experts=True" if cfg.experts else "train_router=True"
        raise UpcycleError(f"LoRA {what} but the model has no MoE layers; pass experts=False and "
                           "train_router=False for a dense model")
    if not targets and not cfg.experts and not cfg.train_router:
        raise UpcycleError("LoRA config selects nothing to train: no target_modules, experts=False, "
                           "train_router=False")

    if cfg.experts:  # before freezing anything: shared_base=True on experts that differ raises here
        share_experts(model, cfg.shared_base)
    model.requires_grad_(False)
    kw = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora)
    for name in targets:
        module = modules[name]
        wrapper = next(w for t, w in LORA_WRAPPERS.items() if isinstance(module, t))
        _replace(model, name, wrapper(module, **kw))
    for block in blocks.values():
        if cfg.experts:
            block.experts = LoraExperts(block.experts, **kw)
            _wrap_shared_expert(block, kw)
        if cfg.train_router:
            block.router.requires_grad_(True)
    for name, m in lora_modules(model).items():
        if not any(p.requires_grad for p in m.parameters()):  # defensive: a wrapper that froze its own adapter
            raise UpcycleError(f"LoRA module {name} has no trainable parameters")
    setattr(model, CONFIG_ATTR, cfg)
    return model


def _wrap_shared_expert(block: MoEBlock, kw: dict) -> None:
    """LoRA on the shared expert's projections too: they are the MoE layer's always-on expert, and
    Linear layers (plain or NF4), so the Linear wrapper serves. Ones ``target_modules`` already named
    keep that adapter."""
    shared = block.shared_expert
    if shared is None:
        return
    for name, proj in list(shared.named_children()):
        wrapper = next((w for t, w in LORA_WRAPPERS.items() if type(proj) is t), None)
        if wrapper is not None:
            setattr(shared, name, wrapper(proj, **kw))


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA wrapper in ``model`` by qualified name (``LoraLinear``-like and ``LoraExperts``)."""
    kinds = (LoraExperts, *set(LORA_WRAPPERS.values()))
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def trainable_summary(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line: trainable / all parameters and the percentage.

    With shared expert bases, a second line: the expert base bytes unshared -> as stored
    (``shared_base_report``). "all params" counts a shared base once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    pct = 100 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
    rep = shared_base_report(model)
    return line + ("\n" + format_shared_base_report(rep) if rep["num_shared"] else "")


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weights (forward then skips the LoRA path).

    Shared expert bases are un-shared first (E materialised copies: the merged experts differ)."""
    unshare_experts(model)
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``."""
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base modules back (for writing a merged checkpoint).

    Shared expert bases are un-shared first (the merged experts differ)."""
    unshare_experts(model)
    wrappers = lora_modules(model)
    for name, m in wrappers.items():
        m.merge()
    for name in sorted(wrappers, key=lambda n: -n.count(".")):  # innermost first
        _replace(model, name, wrappers[name].base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging it (PEFT's ``unload``): the base modules come back as they were."""
    wrappers = lora_modules(model)
    for m in wrappers.values():
        m.unmerge()
    for name in sorted(wrappers, key=lambda n: -n.count(".")):
        _replace(model, name, wrappers[name].base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
