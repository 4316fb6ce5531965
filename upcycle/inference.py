"""Evaluation and generation on upcycled checkpoints, adapters, ESFT checkpoints and dense sources
(loaded by ``upcycle.models.loader``).

    upcycle eval runs/smollm2-moe --text play.txt --baseline
    upcycle eval runs/qlora/checkpoints/last --text play.txt --baseline      # the adapter and its base
    upcycle generate runs/smollm2-moe --prompt "What is a sonnet?"
"""

from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from upcycle.errors import UpcycleError
from upcycle.moe.block import routing_stats
from upcycle.moe.stats import RoutingStats


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise UpcycleError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise UpcycleError(f"{path} is not UTF-8 text") from None


def eval_plan(path: str, baseline: str | None, *, base: str | None = None,
              merge: bool = False) -> list[tuple[str, dict, str | None]]:
    """What ``upcycle eval`` evaluates, in table order (the baseline first): (spec, keywords for
    ``load_model_and_tokenizer``, what the row is, or None to let the loaded model say).

    ``baseline``: a model to compare with, or ``"@source"`` (``--baseline`` without a value): an
    upcycled checkpoint's dense source, an adapter's or ESFT checkpoint's base. An adapter's or
    ESFT checkpoint's base is found and checked here, once, before anything loads.
    """
    from upcycle.models.loader import checkpoint_kind

    kind = checkpoint_kind(path)  # a directory that is neither a model nor an adapter: one line now
    if kind not in ("adapter", "esft") and (base or merge):
        raise UpcycleError(f"{'--base' if base else '--merge'} applies to an adapter directory or an ESFT "
                           f"checkpoint; {path} is a model itself")
    main: tuple[str, dict, str | None] = (path, {}, None)
    if kind == "adapter":
        from upcycle.adapters.adapted import resolve_base

        base = resolve_base(path, base)
        main = (path, {"base": base, "merge": merge, "verify_base": False}, None)
    elif kind == "esft":
        from upcycle.models.esft import esft_base, read_esft_config

        base = esft_base(path, read_esft_config(path), base)
        main = (path, {"base": base, "verify_base": False}, "ESFT checkpoint on its base")
    if not baseline:
        return [main]
    if baseline != "@source":
        return [(baseline, {}, "baseline"), main]
    if base is not None:
        return [(base, {}, "base"), main]
    from upcycle.models.recorded import reopen_source
    from upcycle.models.upcycled import describe

    info = describe(path)
    if not info["upcycled"]:
        raise UpcycleError("--baseline without a value needs an upcycled checkpoint (it evaluates its source), an "
                           "adapter or an ESFT checkpoint (their base)")
    # The recorded source, found and checked by its fingerprint: never another model of the same name.
    source = reopen_source(info["source"], info["source_fingerprint"], what=f"the dense source of {path}",
                           near=path, hint="; name the model to compare with: --baseline PATH")
    return [(source, {}, "dense source"), main]


def check_token_ids(model, max_id: int, what: str) -> None:
    """UpcycleError when token ids up to ``max_id`` do not fit ``model``'s embeddings: its tokenizer is not the
    model's (else an IndexError deep inside the embedding). ``what`` names the text ("the text of FILE, as the
    tokenizer encodes it,")."""
    rows = model.get_input_embeddings().weight.shape[0]
    if max_id >= rows:
        raise UpcycleError(f"{what} has token id {max_id}, beyond the model's vocabulary ({rows} embeddings): the "
                           "tokenizer does not belong to this model")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_tokens: int | None = None, seq_len: int = 512,
               batch_size: int = 4, progress: bool = True) -> dict:
    """Token-level perplexity over non-overlapping windows of ``seq_len`` tokens.

    The result also holds ``first_logits`` ([seq_len, vocab], float32): the logits of the
    first window, so two models can be compared logit by logit.

    Expert-choice routing groups tokens of one position across the batch, so for such
    models the result depends on ``batch_size`` (recorded in the output).
    """
    if batch_size < 1:
        raise UpcycleError(f"--batch-size must be at least 1, got {batch_size}")
    if seq_len < 2:
        raise UpcycleError(f"--seq-len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 2:
        raise UpcycleError(f"--max-tokens must be at least 2, got {max_tokens}")
    if max_tokens is not None:
        text = text[: max_tokens * 16]  # tokenising a whole corpus to keep a prefix is wasted work
    if not text.strip():  # as train refuses it: whitespace has a perplexity, but not one worth reporting
        raise UpcycleError("the text is empty (nothing but whitespace)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UpcycleError("the text has fewer than 2 tokens")
    check_token_ids(model, max(ids), "the text, as the tokenizer encodes it,")
    windows = [ids[i: i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    full = [w for w in windows if len(w) == seq_len]
    batches = [full[i: i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[w] for w in windows if len(w) != seq_len]
    device = next(model.parameters()).device
    nll_sum, count, first = 0.0, 0, None
    routing: dict[str, list[RoutingStats]] = {}
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
        input_ids = torch.tensor(batch, device=device)
        logits = model(input_ids=input_ids).logits.float()
        first = logits[0].cpu() if first is None else first
        for name, stats in routing_stats(model).items():
            routing.setdefault(name, []).append(stats)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        nll_sum += nll.sum().item()
        count += nll.numel()
    mean = nll_sum / count
    return {"tokens": count, "nll": mean, "ppl": math.exp(mean), "seconds": time.perf_counter() - t0,
            "seq_len": seq_len, "batch_size": batch_size, "first_logits": first, "first_window": len(windows[0]),
            "routing": {name: RoutingStats.combine(s).to_dict() for name, s in routing.items()}}


def routing_table(routing: dict[str, dict]) -> str:
    """Per MoE layer: expert load spread, unrouted / dropped tokens, router entropy; with fine-grained experts
    (granularity G > 1) also per copy: its load spread, copies per token, and de-grouped tokens (a token's
    K choices spanning more than K / G copies)."""
    grouped = any(s.get("granularity", 1) > 1 for s in routing.values())
    rows = []
    for name, s in routing.items():
        loads = s["tokens_per_expert"]
        G = s.get("granularity", 1)
        share = [100 * c / max(1, s["num_assignments"]) for c in loads]
        row = [name.removesuffix(".mlp"), f"{len(loads)}" + (f" ({len(loads) // G}x{G})" if G > 1 else ""),
               f"{min(share):.1f} / {max(share):.1f}", sum(c == 0 for c in loads)]
        if grouped:
            copies = [sum(share[c:c + G]) for c in range(0, len(share), G)]
            row += [f"{min(copies):.1f} / {max(copies):.1f}",
                    "-" if s.get("copies_per_token") is None else f"{s['copies_per_token']:.2f}",
                    "-" if s.get("degrouped_fraction") is None else f"{100 * s['degrouped_fraction']:.2f}"]
        row += [f"{100 * s['unrouted_fraction']:.1f}", f"{100 * s['dropped_fraction']:.1f}",
                f"{s['entropy']:.3f} / {math.log(len(loads)):.3f}"]
        rows.append(row)
    head = ["layer", "experts", "load % min / max", "idle experts"]
    if grouped:
        head += ["copy load % min / max", "copies / token", "de-grouped %"]
    return format_table(head + ["unrouted %", "dropped %", "entropy / log E"], rows)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             chat_template: bool = True, seed: int = 0) -> str:
    """Continue ``prompt`` (wrapped in the tokenizer's chat template when it has one)."""
    if max_new_tokens < 1:
        raise UpcycleError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UpcycleError(f"--temperature must be >= 0, got {temperature}")
    if chat_template and getattr(tokenizer, "chat_template", None):
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    if input_ids.shape[1] == 0:
        raise UpcycleError("the prompt encodes to no tokens")
    check_token_ids(model, int(input_ids.max()), "the prompt, as the tokenizer encodes it,")
    input_ids = input_ids.to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens, pad_token_id=pad,
        **sampling,
    )
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
