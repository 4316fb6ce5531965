"""Stage 4 of ``when_upcycling_pays.py``: what is measured on each branch, the report and the plot.

    python benchmarks/when_upcycling_pays.py --out runs/pays    # imports this; run that, not this

A branch is a name ``KIND`` or ``KIND@sN`` (the same branch with seed N; see ``when_upcycling_pays``).
Every branch is compared with the dense branch of its own seed (the same data order), so two seeds give
two paired gaps, and their mean.

Training FLOPs per token are 6 x (parameters a token passes through: attention, norms, the router, K
experts of E (C for expert choice), a shared expert, the LM head; not the embedding lookup) plus 6 x
layers x seq_len x hidden for the attention scores (causal: half the full 12): a fine-grained top-G
upcycle passes through one copy's worth of segments, the dense model's FLOPs plus its router's.
"""

from __future__ import annotations

import glob
import json
import os

import torch

SEED_SEP = "@s"


def split_name(name: str) -> tuple[str, int]:
    """``fg-E8G4@s1`` -> (``fg-E8G4``, 1); a plain name is seed 0 (no validation: see the study's)."""
    kind, sep, rep = name.partition(SEED_SEP)
    return kind, int(rep) if sep else 0


def dense_of(name: str) -> str:
    """The dense branch a branch is compared with: the one of the same seed."""
    seed = split_name(name)[1]
    return "dense" if seed == 0 else f"dense{SEED_SEP}{seed}"


def flops_per_token(path: str, seq_len: int) -> tuple[float, int, int]:
    """(training FLOPs per token, total params, active params per token) of a checkpoint."""
    from transformers import AutoConfig

    from upcycle.models import describe

    info = describe(path)
    cfg = AutoConfig.from_pretrained(path)
    cfg = getattr(cfg, "text_config", cfg)
    active = info["active_params_per_token"]
    if not getattr(cfg, "tie_word_embeddings", False):
        active -= cfg.vocab_size * cfg.hidden_size  # the input embedding is a lookup, not a matmul
    return 6 * active + 6 * cfg.num_hidden_layers * seq_len * cfg.hidden_size, info["total_params"], \
        info["active_params_per_token"]


def _mlp_stacks(path: str, granularity: int = 1) -> dict[int, torch.Tensor]:
    """Layer -> its MLP weights as [copies, N]: an MoE layer's routed experts (every ``experts.*_proj``
    stack, a copy's G segments side by side; a shared expert is left out: it is no copy), a dense MLP
    as one copy (gate, up, down)."""
    from safetensors import safe_open

    parts: dict[int, dict[str, torch.Tensor]] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if ".mlp." in k and ".layers." in k and k.endswith(("_proj", "_proj.weight")) and "shared_expert" not in k:
                    layer = int(k.split(".layers.")[1].split(".")[0])
                    parts.setdefault(layer, {})[k.split(".mlp.")[1]] = st.get_tensor(k).double()
    out = {}
    for layer, w in parts.items():
        names = sorted(w)  # the same order at both ends of a comparison
        if names[0].startswith("experts."):
            out[layer] = torch.cat([w[n].reshape(w[n].shape[0] // granularity, -1) for n in names], 1)
        else:
            out[layer] = torch.cat([w[n].flatten() for n in names])[None]
    return out


def mlp_moved(start: str, end: str, layers: list[int], granularity: int = 1) -> dict:
    """How far the MLP weights of ``layers`` moved from ``start`` to ``end``, over a copy's norm at the
    start (their mean): ``each`` (mean over copies of each copy's move) and ``mean`` (the move of the
    copies' mean). For a dense MLP the two are equal; for copies that move apart, ``mean`` is far below
    ``each``."""
    a, b = _mlp_stacks(start, granularity), _mlp_stacks(end, granularity)
    each, mean = [], []
    for layer in layers:
        w0, w1 = a[layer], b[layer]
        norm = w0.norm(dim=1).mean()  # permuted copies: each copy's norm, not their (shrunken) mean's
        each.append(float((w1 - w0).norm(dim=1).mean() / norm))
        mean.append(float((w1 - w0).mean(0).norm() / norm))
    return {"each": sum(each) / len(each), "mean": sum(mean) / len(mean)}


def expert_spread(path: str, granularity: int = 1) -> list[float]:
    """Per MoE layer: RMS distance of the copies' weights from their mean, over the mean's norm (0 for
    a plain upcycle: every copy the same; permuted copies start apart in this measure, not in function)."""
    out = []
    for _, w in sorted(_mlp_stacks(path, granularity).items()):
        if w.shape[0] > 1:  # an MoE layer (a dense one is one copy)
            mean = w.mean(0)
            out.append(float((w - mean).pow(2).sum(1).mean().sqrt() / mean.norm()))
    return out


def _rows(run: str, kind: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("type") == kind]
    return list({r["step"]: r for r in rows}.values())  # a resumed run's rows: the last of each step wins


def interp(xs: list[float], ys: list[float], x: float) -> float | None:
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def measure(out: str, p, name: str, start: str, n_layers: int, granularity: int) -> dict:
    """Everything the report reads of one branch: its held-out curve, FLOPs, routing, experts' spread."""
    run = os.path.join(out, "branches", name)
    s = json.load(open(os.path.join(run, "summary.json")))
    evals = _rows(run, "eval")
    fpt, total, active = flops_per_token(s["last_checkpoint"], p.seq_len)
    train = _rows(run, "train")
    kind, seed = split_name(name)
    r = {
        "branch": name, "kind": kind, "seed": seed, "total_params": total, "active_params": active,
        "flops_per_token": fpt, "tokens": [e["tokens"] for e in evals], "flops": [e["tokens"] * fpt for e in evals],
        "loss": [e["loss"] for e in evals], "steps": s["steps"],
        # Over every session of the run (resumes included), evaluations and saves included.
        "wall_s": round(train[-1]["elapsed_s"], 1), "tokens_per_s": s["tokens"] / max(train[-1]["elapsed_s"], 1e-9),
    }
    # The upcycled layers: the last half (the dense branch's MLPs there, for comparison).
    moe_start = os.path.join(out, "models", name)
    layers = list(range(n_layers - n_layers // 2, n_layers))
    r["mlp_moved"] = mlp_moved(moe_start if kind != "dense" else start, s["last_checkpoint"], layers, granularity)
    routing = train[-1].get("routing") or {}
    if routing:
        last = list(routing.values())
        r["routing"] = {k: _mean([layer[k] for layer in last])
                        for k in ("load_max", "load_min", "load_entropy", "router_entropy", "dropped")}
        r["routing"]["dead_experts"] = sum(int(layer.get("dead_experts") or 0) for layer in last)
        # Router entropy at the first logging window, to see whether the router learned at all.
        first = list((train[0].get("routing") or {}).values())
        r["routing"]["router_entropy_first"] = _mean([layer["router_entropy"] for layer in first]) if first else 0.0
        if granularity > 1:
            # De-grouping over training: per logging window, the tokens whose K choices span more
            # copies than K / G (mean over the MoE layers).
            windows = [(t["tokens"], _mean([layer["degrouped"] for layer in t["routing"].values()]),
                        _mean([layer["copies_per_token"] for layer in t["routing"].values()]))
                       for t in train if t.get("routing")]
            r["degrouped"] = {"tokens": [w[0] for w in windows], "fraction": [w[1] for w in windows],
                              "copies_per_token": [w[2] for w in windows]}
        ckpts = sorted(glob.glob(os.path.join(run, "checkpoints", "step-*")))
        r["spread"] = {"start": expert_spread(moe_start, granularity),
                       **{os.path.basename(c): expert_spread(c, granularity) for c in ckpts}}
    return r


def crossing(dense: dict, moe: dict, axis: str) -> dict:
    """Where the MoE curve goes (and stays) below the dense one on ``axis`` (tokens or flops)."""
    gaps = []
    for x, y in zip(moe[axis][1:], moe["loss"][1:]):  # not the branch point itself
        d = interp(dense[axis], dense["loss"], x)
        if d is not None:
            gaps.append((x, y - d))
    below = [i for i, (_, g) in enumerate(gaps) if g < 0]
    first_for_good = next((gaps[i][0] for i in range(len(gaps)) if all(g < 0 for _, g in gaps[i:])), None)
    return {"gaps": gaps, "crosses_at": first_for_good, "below_points": len(below),
            "final_gap": gaps[-1][1] if gaps else None}


def at_budget(r: dict, dense: dict, budget: float | None) -> dict:
    """A branch read at the MoE budget (tokens): its loss, and its dense partner's at the same tokens
    and at the same training FLOPs (None where the dense curve does not reach)."""
    i = max(i for i, t in enumerate(r["tokens"]) if budget is None or t <= budget)
    tokens, flops, loss = r["tokens"][i], r["flops"][i], r["loss"][i]
    d_tok = interp(dense["tokens"], dense["loss"], tokens)
    d_flops = interp(dense["flops"], dense["loss"], flops)
    out = {"index": i, "tokens": tokens, "loss": loss, "dense_tokens": d_tok, "dense_flops": d_flops,
           "gap_tokens": None if d_tok is None else loss - d_tok,
           "gap_flops": None if d_flops is None else loss - d_flops}
    if r.get("degrouped"):
        frac = r["degrouped"]["fraction"]
        out["degrouped"] = {"first": frac[0], "mean": _mean(frac), "last": frac[-1]}
    return out


def _fmt(v, f="{:.4f}"):
    return "n/a" if v is None else f.format(v)


def _signed(v):
    return "n/a" if v is None else f"{v:+.4f}"


def summary_table(results: list[dict], budget: float | None) -> tuple[list[str], dict]:
    """The answer table: per branch and seed, the loss at the MoE budget against its dense partner at
    equal tokens and at equal FLOPs; a mean row for every branch run with more than one seed."""
    by = {r["branch"]: r for r in results}
    reads = {r["branch"]: at_budget(r, by.get(dense_of(r["branch"]), by["dense"]), budget) for r in results}
    dense_fpt = by["dense"]["flops_per_token"]
    lines = ["| branch | seed | FLOPs/token (x dense) | held-out loss at the MoE budget | dense at the same tokens | "
             "gap (equal tokens) | dense at the same FLOPs | gap (equal FLOPs) | de-grouped: first / mean / last |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    means = {}
    for kind in kinds:
        runs = [r for r in results if r["kind"] == kind]
        for r in runs:
            a = reads[r["branch"]]
            dg = a.get("degrouped")
            dense = kind == "dense"
            lines.append(
                f"| {kind} | {r['seed']} | {r['flops_per_token'] / dense_fpt:.3f} | {a['loss']:.4f} | "
                + ("- | - | - | - | " if dense else
                   f"{_fmt(a['dense_tokens'])} | {_signed(a['gap_tokens'])} | {_fmt(a['dense_flops'])} | "
                   f"{_signed(a['gap_flops'])} | ")
                + (f"{dg['first']:.1%} / {dg['mean']:.1%} / {dg['last']:.1%} |" if dg else "- |"))
        if len(runs) > 1:
            reads_k = [reads[r["branch"]] for r in runs]
            m = {k: (_mean([a[k] for a in reads_k]) if all(a[k] is not None for a in reads_k) else None)
                 for k in ("loss", "dense_tokens", "gap_tokens", "dense_flops", "gap_flops")}
            m["seeds"] = len(runs)
            means[kind] = m
            lines.append(
                f"| **{kind}** | mean of {len(runs)} | {runs[0]['flops_per_token'] / dense_fpt:.3f} | "
                f"**{m['loss']:.4f}** | "
                + ("- | - | - | - | - |" if kind == "dense" else
                   f"{_fmt(m['dense_tokens'])} | **{_signed(m['gap_tokens'])}** | {_fmt(m['dense_flops'])} | "
                   f"**{_signed(m['gap_flops'])}** | |"))
    return lines, {"reads": reads, "means": means}


def report(p, results: list[dict], env: dict, plot: str) -> tuple[str, dict]:
    """report.md's text, and the summary numbers results.json keeps."""
    by = {r["branch"]: r for r in results}
    dense = by["dense"]
    moe = [r for r in results if r["kind"] != "dense"]
    budget = max(r["tokens"][-1] for r in moe) if moe else None
    lines = [f"{env['date']}, {env['device']} ({env['cpus']} CPU threads), torch {env['torch']}; preset "
             f"{env['preset']}: base {env['base']}, branches of {p.branch_steps} steps x {p.batch} x {p.seq_len} "
             f"tokens (dense: {dense['steps']} steps); base lr {p.base_lr:g} ({p.base_decay} after warmup), branches "
             f"{p.base_lr * p.branch_lr_mult:g} constant after warmup, router lr x{p.router_lr_mult:g}.", ""]
    table, summary = summary_table(results, budget)
    lines += table
    lines += ["", "Each branch against the dense branch of its own seed (a seed is the branch's data order and, "
              "for an upcycle, its router's initialisation; the base is shared). Gaps are held-out loss minus "
              "dense's: negative, the upcycle is ahead. 'Dense at the same FLOPs' reads the (longer) dense curve "
              "at the branch's training FLOPs. De-grouped: the tokens whose K choices span more copies than "
              "K / G, in the first logging window, over all of them, in the last (mean over MoE layers).", ""]
    lines += ["| branch | total params | active/token | FLOPs/token | held-out loss at start | crosses dense (tokens) "
              "| crosses dense (FLOPs) | load max/min x E | router entropy first -> last | dead | copy spread | "
              "MLP moved: each / mean | wall s | tokens/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        partner = by.get(dense_of(r["branch"]), dense)
        ct, cf = (crossing(partner, r, "tokens"), crossing(partner, r, "flops")) if r["kind"] != "dense" else ({}, {})
        rt, spread = r.get("routing"), r.get("spread")
        last_spread = list(spread.values())[-1] if spread else None
        lines.append(
            f"| {r['branch']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
            f"{r['flops_per_token'] / 1e6:.1f}M | {r['loss'][0]:.4f} | "
            f"{_fmt(ct.get('crosses_at'), '{:,.0f}') if ct else '-'} | {_fmt(cf.get('crosses_at'), '{:.3g}') if cf else '-'} | "
            + (f"{rt['load_max']:.2f}/{rt['load_min']:.2f} | {rt['router_entropy_first']:.3f} -> "
               f"{rt['router_entropy']:.3f} | {rt['dead_experts']} | "
               f"{_mean(spread['start']):.4f} -> {_mean(last_spread):.4f} | " if rt else "- | - | - | - | ")
            + f"{r['mlp_moved']['each']:.3f} / {r['mlp_moved']['mean']:.3f} | "
            f"{r['wall_s']:,.0f} | {r['tokens_per_s']:,.0f} |")
    lines += ["", "'crosses dense': the first evaluation from which the branch stays below its dense partner (n/a: "
              "it does not, within the budget). Copy spread: RMS distance of the copies' routed weights (a copy's "
              "segments side by side) from their mean over the mean's norm, averaged over MoE layers, at the start "
              "and the end (permuted copies start apart in this measure, not in function). MLP moved: how far the "
              "upcycled layers' routed MLP weights moved over the branch, over their norm: each copy on average / "
              "the copies' mean (the dense branch: its MLPs in those layers). Wall time: other jobs shared the cores.",
              "", f"![held-out loss]({os.path.basename(plot)})"]
    summary["crossings"] = {r["branch"]: {ax: crossing(by.get(dense_of(r["branch"]), dense), r, ax)
                                          for ax in ("tokens", "flops")} for r in moe}
    return "\n".join(lines), summary


def plot_curves(results: list[dict], path: str, title: str) -> None:
    """Four panels: held-out loss against tokens; the gap to the same seed's dense branch at equal tokens
    and at equal training FLOPs; de-grouping over training. A branch's seeds share a colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["branch"]: r for r in results}
    kinds = [k for k in dict.fromkeys(r["kind"] for r in results) if k != "dense"]
    colour = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)} | {"dense": "black"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    (loss_ax, tok_ax), (flops_ax, dg_ax) = axes

    def style(r):
        return dict(color=colour[r["kind"]], lw=2 if r["kind"] == "dense" else 1.3,
                    ls="-" if r["seed"] == 0 else "--", label=r["branch"])

    for r in results:
        loss_ax.plot(r["tokens"], r["loss"], **style(r))
    loss_ax.set(xlabel="tokens since the branch point", ylabel="held-out loss")
    for ax, axis, label in ((tok_ax, "tokens", "tokens since the branch point"),
                            (flops_ax, "flops", "training FLOPs since the branch point")):
        ax.axhline(0, color="black", lw=2)
        for r in results:
            if r["kind"] != "dense":
                gaps = crossing(by.get(dense_of(r["branch"]), by["dense"]), r, axis)["gaps"]
                ax.plot([g[0] for g in gaps], [g[1] for g in gaps], marker=".", **style(r))
        ax.set(xlabel=label, ylabel=f"held-out loss - dense's (same seed) at the same {axis}")
    for r in results:
        if r.get("degrouped"):
            d = r["degrouped"]
            dg_ax.plot(d["tokens"], [100 * f for f in d["fraction"]], marker=".", **style(r))
    dg_ax.set(xlabel="tokens since the branch point", ylabel="de-grouped tokens, % (K choices span > K/G copies)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    tok_ax.set_title("equal tokens")
    flops_ax.set_title("equal training FLOPs")
    dg_ax.set_title("fine-grained: de-grouping")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)
