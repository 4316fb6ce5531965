"""When does upcycling pay? A dense base trained from scratch, then dense vs upcycled continuations.

    python benchmarks/when_upcycling_pays.py --out runs/pays             # the CPU study (~80 min, 2 cores)
    python benchmarks/when_upcycling_pays.py --quick --out runs/pays-q   # the pipeline only (~1 min)
    python benchmarks/when_upcycling_pays.py --gpu --out runs/pays-gpu   # SmolLM2-135M base, one GPU

``--gpu`` needs the project's dependencies (``datasets``, ``gguf``) and the offline text
packages on the GPU machine: not the lent H200 image, which lacks both and cannot receive the
94 MiB GGUF; results from it are not recorded yet.

Stages, each a directory under OUT (a killed study continues where it stopped; a finished
stage is skipped; ``--set branch_steps=N`` with a larger N extends a finished study):

1. ``corpus/``: the offline English text (``upcycle.data.corpora.english_files``): train
   documents, and held-out documents no stage trains on; ``init/``: a byte-level BPE tokenizer
   trained on the train documents and a randomly initialised Llama (``--gpu``: the embedded
   SmolLM2-135M and its tokenizer instead, no base stage).
2. ``base/``: ``upcycle train`` of the dense model from scratch (warmup, then a constant
   learning rate, so the base is mid-training, not saturated or annealed, where it branches).
3. ``branches/NAME/``: from the base's last checkpoint, each branch upcycles it
   (``upcycle convert``, the last half of the layers) or keeps it dense, and continues with
   ``upcycle train`` on the same tokens in the same order, same learning rates, a fresh
   optimizer. The dense branch runs longer, so that it can be read at the FLOPs of the MoE
   branches too.
4. ``results.json`` / ``report.md`` / the plot: held-out loss against tokens and against
   training FLOPs, the routing telemetry of the last logging window (load balance, dead
   experts, router entropy), how far the experts have moved apart (relative spread of the
   expert weights around their mean, per MoE layer), and wall time.

Training FLOPs per token are 6 x (parameters a token passes through: attention, norms, the
router, K experts of E (C for expert choice), the LM head; not the embedding lookup) plus
6 x layers x seq_len x hidden for the attention scores (causal: half the full 12).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import platform
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Preset:
    """One size of the study."""

    vocab: int = 4096            # BPE vocabulary (ignored with a given base model)
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    ffn: int = 688               # SwiGLU width (8/3 x hidden, rounded)
    seq_len: int = 256
    batch: int = 16              # sequences per step
    micro: int = 16
    base_lr: float = 1.5e-3
    base_steps: int = 500
    base_warmup: int = 25
    base_decay: str = "cosine"   # the base's schedule after warmup: cosine to 0.1 (a finished model), or constant
    branch_steps: int = 250
    branch_warmup: int = 10
    branch_lr_mult: float = 0.3  # branch lr (experts, attention, the rest) = this x base_lr
    dense_extra: float = 1.35    # the dense branch runs this much longer (its FLOPs reach the MoEs')
    eval_every: int = 25
    eval_chars: int = 14000      # held out: this many characters from the middle of every held-out document
    router_lr_mult: float = 1.0  # router lr = this x the branch lr (20 was continued_pretraining's; see docs)
    base_model: str | None = None  # a dense source to branch from instead of training one
    max_train_docs: int | None = None
    precision: str = "auto"
    branches: tuple[str, ...] = ("dense", "top2-E8", "drop-E8", "ec-C2-E8", "top2-E32", "top2-E8-fast-router")


PRESETS = {
    "cpu": Preset(),
    # The pipeline in about a minute: a model too small and too short to show anything.
    "quick": Preset(vocab=384, hidden=64, layers=2, heads=2, ffn=172, seq_len=64, batch=4, micro=4, base_steps=8,
                    base_warmup=2, branch_steps=4, branch_warmup=1, eval_every=2, eval_chars=3000, max_train_docs=6,
                    branches=("dense", "top2-E8", "drop-E8", "ec-C2-E8")),
    # The embedded SmolLM2-135M (30 layers; the last 15 upcycled), bf16 on an H200.
    "gpu": Preset(hidden=576, layers=30, seq_len=1024, batch=32, micro=32, base_lr=3e-4, base_steps=0,
                  branch_steps=120, branch_warmup=10, eval_every=20, eval_chars=60000, base_model="smollm2-135m",
                  branches=("dense", "top2-E8", "drop-E8", "ec-C2-E8")),
}

# name -> (upcycle convert settings, or None for the dense continuation)
BRANCHES = {
    "dense": None,
    "top2-E8": dict(num_experts=8, top_k=2),
    "drop-E8": dict(num_experts=8, top_k=2, reinit_ratio=0.5),
    "ec-C2-E8": dict(num_experts=8, routing="expert-choice", capacity=2.0),
    "top2-E32": dict(num_experts=32, top_k=2),
    "top1-E8": dict(num_experts=8, top_k=1, normalize_topk=False),
    "top2-E8-slow-router": dict(num_experts=8, top_k=2, router_lr_mult=1.0),
    "top2-E8-fast-router": dict(num_experts=8, top_k=2, router_lr_mult=20.0),
    "top2-E8-slow-experts": dict(num_experts=8, top_k=2, experts_lr_mult=0.5),
    "top2-E8-no-aux": dict(num_experts=8, top_k=2, aux_loss_weight=0.0),
    "top2-E8-noise": dict(num_experts=8, top_k=2, expert_noise=0.01),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- stage 1: corpus, tokenizer, init

def build_corpus(out: str, p: Preset) -> dict:
    from upcycle.data.corpora import english_files
    from upcycle.io import atomic_dir, write_json

    folder = os.path.join(out, "corpus")
    manifest = os.path.join(folder, "manifest.json")
    if os.path.isfile(manifest):
        return json.load(open(manifest))
    train, heldout, sources = english_files()
    if p.max_train_docs:  # --quick: a few documents, so tokenising and training take seconds
        train, heldout = train[: p.max_train_docs], heldout[:2]
    # Every evaluation reads all of it: an excerpt of every held-out document (not the first
    # micro-batches of one play), the same for every stage and branch.
    heldout = [(name, _middle(text, p.eval_chars)) for name, text in heldout]
    with atomic_dir(folder, overwrite=True) as tmp:
        info = {"sources": sources}
        for split, files in (("train", train), ("eval", heldout)):
            os.makedirs(os.path.join(tmp, split))
            for i, (name, text) in enumerate(files):
                with open(os.path.join(tmp, split, f"{i:04d}-{name}.txt"), "w", encoding="utf-8") as f:
                    f.write(text)
            info[split] = {"documents": len(files), "chars": sum(len(t) for _, t in files)}
        write_json(os.path.join(tmp, "manifest.json"), info)
    log(f"corpus: {info['train']['documents']} train documents ({info['train']['chars'] / 1e6:.1f}M chars), "
        f"{info['eval']['documents']} held out ({info['eval']['chars'] / 1e6:.2f}M chars)")
    return info


def _middle(text: str, n: int) -> str:
    """About ``n`` characters from the middle of ``text``, cut at line ends."""
    if len(text) <= n:
        return text
    a = text.rfind("\n", 0, (len(text) - n) // 2) + 1
    b = text.find("\n", a + n)
    return text[a: b if b > 0 else len(text)]


def build_init(out: str, p: Preset, seed: int) -> str:
    """A byte-level BPE tokenizer trained on the train documents and a random Llama, saved together."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from upcycle.io import atomic_dir

    folder = os.path.join(out, "init")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=p.vocab, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(sorted(glob.glob(os.path.join(out, "corpus", "train", "*.txt"))), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=p.hidden, intermediate_size=p.ffn,
                         num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
                         max_position_embeddings=p.seq_len, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n = sum(t.numel() for t in model.parameters())
    log(f"init: vocab {config.vocab_size}, {p.layers} layers x {p.hidden}, {n / 1e6:.2f}M parameters")
    return folder


# ---------------------------------------------------------------- stages 2-3: upcycle train runs

def _finished(run: str, steps: int) -> dict | None:
    path = os.path.join(run, "summary.json")
    if os.path.isfile(path):
        s = json.load(open(path))
        if s["steps"] >= steps and not s.get("stopped_by"):
            return s
    return None


def run_train(run: str, steps: int, overrides: list[str]) -> dict:
    """One ``upcycle train`` run of ``steps`` steps: skipped when finished, resumed from its newest
    checkpoint when it has one (a killed run, or a finished one that a larger budget extends: the
    learning rate is constant there, so the longer run is the shorter one continued)."""
    from upcycle.train import load_recipe, train
    from upcycle.train.checkpointing import checkpoint_dirs

    done = _finished(run, steps)
    if done:
        log(f"{run}: finished earlier ({done['steps']} steps)")
        return done
    resume = ["resume=auto"] if checkpoint_dirs(run, resumable=True) else ["overwrite=true"]
    cfg = load_recipe("continued_pretraining", [f"out={run}", f"max_steps={steps}", *overrides, *resume])
    log(f"{run}: training ({cfg.max_steps} steps{', resuming' if resume[0] == 'resume=auto' else ''})")
    t0 = time.perf_counter()
    s = train(cfg)
    if s.get("stopped_by"):
        raise SystemExit(f"{run}: stopped by {s['stopped_by']}; run the study again to continue")
    s["wall_s"] = round(time.perf_counter() - t0, 1)
    return s


def common(p: Preset, out: str, seed: int) -> list[str]:
    corpus = os.path.join(out, "corpus")
    return [f"data.train={corpus}/train", f"data.eval={corpus}/eval", f"data.seq_len={p.seq_len}",
            f"batch_size={p.batch}", f"micro_batch_size={p.micro}", f"eval_every={p.eval_every}",
            "eval_at_start=true", "keep_last=null", "log_every=5",
            f"seed={seed}", "optim.weight_decay=0.1", f"precision={p.precision}", "progress=false",
            "tensorboard=false"]


def base_stage(out: str, p: Preset, init: str, seed: int) -> str:
    """The dense base, trained from scratch; returns the checkpoint the branches start from."""
    if p.base_model:
        return p.base_model
    run = os.path.join(out, "base")
    s = run_train(run, p.base_steps, [f"model={init}", f"save_every={p.base_steps}",
                        f"optim.lr={p.base_lr}", f"schedule.decay={p.base_decay}", "schedule.min_lr_ratio=0.1",
                        f"schedule.warmup_steps={p.base_warmup}",
                        *common(p, out, seed)])
    return s["last_checkpoint"]


def branch_stage(out: str, p: Preset, name: str, start: str, seed: int) -> dict:
    import upcycle

    spec = dict(BRANCHES[name] or {})
    router_mult = spec.pop("router_lr_mult", p.router_lr_mult)
    experts_mult = spec.pop("experts_lr_mult", 1.0)
    aux = spec.pop("aux_loss_weight", None)
    steps = p.branch_steps if spec else math.ceil(p.branch_steps * p.dense_extra)
    model = start
    if spec:
        model = os.path.join(out, "models", name)
        if not os.path.isfile(os.path.join(model, "config.json")):
            init = {k: spec.pop(k) for k in ("reinit_ratio", "expert_noise") if k in spec}
            layers = _num_layers(start) // 2  # the last half, as Komatsuzaki et al. (every other layer there)
            upcycle.convert(upcycle.ConvertConfig(out=model, model=start, layers=layers, moe=upcycle.MoEConfig(**spec),
                                                  seed=seed, overwrite=True, progress=False, **init))
    lr = p.base_lr * p.branch_lr_mult
    overrides = [f"model={model}", f"save_every={max(p.branch_steps // 4, 1)}", f"optim.lr={lr}",
                 f"optim.experts_lr={lr * experts_mult}", f"optim.router_lr={lr * router_mult}", "schedule.decay=constant",
                 f"schedule.warmup_steps={p.branch_warmup}", *common(p, out, seed + 1)]
    if aux is not None:
        overrides.append(f"aux_loss_weight={aux}")
    return run_train(os.path.join(out, "branches", name), steps, overrides)


def _num_layers(model: str) -> int:
    from upcycle.models.sources import open_source

    with open_source(model) as src:
        return getattr(src.config, "text_config", src.config).num_hidden_layers


# ---------------------------------------------------------------- stage 4: measurements and report

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


def _mlp_stacks(path: str) -> dict[int, torch.Tensor]:
    """Layer -> its MLP weights as [E, N]: an MoE layer's experts (every ``experts.*_proj`` stack,
    flattened per expert), a dense MLP as E=1 (gate, up, down)."""
    from safetensors import safe_open

    parts: dict[int, dict[str, torch.Tensor]] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if ".mlp." in k and ".layers." in k and k.endswith(("_proj", "_proj.weight")):
                    layer = int(k.split(".layers.")[1].split(".")[0])
                    parts.setdefault(layer, {})[k.split(".mlp.")[1]] = st.get_tensor(k).double()
    out = {}
    for layer, w in parts.items():
        names = sorted(w)  # the same order at both ends of a comparison
        out[layer] = (torch.cat([w[n].reshape(w[n].shape[0], -1) for n in names], 1) if names[0].startswith("experts.")
                      else torch.cat([w[n].flatten() for n in names])[None])
    return out


def mlp_moved(start: str, end: str, layers: list[int]) -> dict:
    """How far the MLP weights of ``layers`` moved from ``start`` to ``end``, over the start's norm:
    ``each`` (mean over experts of each expert's move) and ``mean`` (the move of the experts' mean).
    For a dense MLP the two are equal; for experts that move apart, ``mean`` is far below ``each``."""
    a, b = _mlp_stacks(start), _mlp_stacks(end)
    each, mean = [], []
    for layer in layers:
        w0, w1 = a[layer], b[layer]
        norm = w0.mean(0).norm()
        each.append(float((w1 - w0).norm(dim=1).mean() / norm))
        mean.append(float((w1 - w0).mean(0).norm() / norm))
    return {"each": sum(each) / len(each), "mean": sum(mean) / len(mean)}


def expert_spread(path: str) -> list[float]:
    """Per MoE layer: RMS distance of the experts' weights from their mean, over the mean's norm
    (0 for a plain upcycle: every expert a copy)."""
    out = []
    for _, w in sorted(_mlp_stacks(path).items()):
        if w.shape[0] > 1:  # an MoE layer (a dense one is E=1)
            mean = w.mean(0)
            out.append(float((w - mean).pow(2).sum(1).mean().sqrt() / mean.norm()))
    return out


def _rows(run: str, kind: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("type") == kind]


def _interp(xs: list[float], ys: list[float], x: float) -> float | None:
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def measure(out: str, p: Preset, name: str, start: str) -> dict:
    run = os.path.join(out, "branches", name)
    s = json.load(open(os.path.join(run, "summary.json")))
    evals = list({r["step"]: r for r in _rows(run, "eval")}.values())
    fpt, total, active = flops_per_token(s["last_checkpoint"], p.seq_len)
    train = _rows(run, "train")  # a resumed run's rows: the last of each step wins
    train = list({r["step"]: r for r in train}.values())
    routing = train[-1].get("routing") or {}
    r = {
        "branch": name, "total_params": total, "active_params": active, "flops_per_token": fpt,
        "tokens": [e["tokens"] for e in evals], "flops": [e["tokens"] * fpt for e in evals],
        "loss": [e["loss"] for e in evals], "steps": s["steps"],
        # Over every session of the run (resumes included), evaluations and saves included.
        "wall_s": round(train[-1]["elapsed_s"], 1), "tokens_per_s": s["tokens"] / max(train[-1]["elapsed_s"], 1e-9),
    }
    # The upcycled layers: the last half (the dense branch's MLPs there, for comparison).
    n_layers = _num_layers(start)
    first_start = start if name == "dense" else os.path.join(out, "models", name)
    r["mlp_moved"] = mlp_moved(first_start, s["last_checkpoint"], list(range(n_layers - n_layers // 2, n_layers)))
    if routing:
        layers = list(routing.values())
        r["routing"] = {k: sum(l[k] for l in layers) / len(layers)
                        for k in ("load_max", "load_min", "load_entropy", "router_entropy", "dropped")}
        r["routing"]["dead_experts"] = sum(int(l.get("dead_experts") or 0) for l in layers)
        # Router entropy at the first logging window, to see whether the router learned at all.
        first = list((train[0].get("routing") or {}).values())
        r["routing"]["router_entropy_first"] = sum(l["router_entropy"] for l in first) / max(len(first), 1)
        ckpts = sorted(glob.glob(os.path.join(run, "checkpoints", "step-*")))
        r["spread"] = {"start": expert_spread(os.path.join(out, "models", name)),
                       **{os.path.basename(c): expert_spread(c) for c in ckpts}}
    return r


def crossing(dense: dict, moe: dict, axis: str) -> dict:
    """Where the MoE curve goes (and stays) below the dense one on ``axis`` (tokens or flops)."""
    gaps = []
    for x, y in zip(moe[axis][1:], moe["loss"][1:]):  # not the branch point itself
        d = _interp(dense[axis], dense["loss"], x)
        if d is not None:
            gaps.append((x, y - d))
    below = [i for i, (_, g) in enumerate(gaps) if g < 0]
    first_for_good = next((gaps[i][0] for i in range(len(gaps)) if all(g < 0 for _, g in gaps[i:])), None)
    return {"gaps": gaps, "crosses_at": first_for_good, "below_points": len(below),
            "final_gap": gaps[-1][1] if gaps else None}


def report(out: str, p: Preset, results: list[dict], env: dict, plot: str) -> str:
    dense = next(r for r in results if r["branch"] == "dense")
    lines = [f"{env['date']}, {env['device']} ({env['cpus']} CPU threads), torch {env['torch']}; preset "
             f"{env['preset']}: base {env['base']}, branches of {p.branch_steps} steps x {p.batch} x {p.seq_len} "
             f"tokens (dense: {dense['steps']} steps); base lr {p.base_lr:g} ({p.base_decay} after warmup), branches "
             f"{p.base_lr * p.branch_lr_mult:g} constant after warmup, router lr x{p.router_lr_mult:g}.", "",
             "| branch | total params | active/token | FLOPs/token | held-out loss at start | at the MoE budget "
             "(tokens) | dense at the same tokens | dense at the same FLOPs | crosses dense (tokens) | "
             "crosses dense (FLOPs) | load max/min x E | router entropy first -> last | dead | expert spread | "
             "MLP moved: each / mean | wall s | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    budget = max(r["tokens"][-1] for r in results if r["branch"] != "dense") if len(results) > 1 else None
    for r in results:
        end_i = max(i for i, t in enumerate(r["tokens"]) if budget is None or t <= budget)
        at_tokens = _interp(dense["tokens"], dense["loss"], r["tokens"][end_i])
        at_flops = _interp(dense["flops"], dense["loss"], r["flops"][end_i])
        ct, cf = (crossing(dense, r, "tokens"), crossing(dense, r, "flops")) if r is not dense else ({}, {})
        rt = r.get("routing")
        spread = r.get("spread")
        last_spread = list(spread.values())[-1] if spread else None
        fmt = lambda v, f="{:.4f}": "n/a" if v is None else f.format(v)  # noqa: E731
        lines.append(
            f"| {r['branch']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
            f"{r['flops_per_token'] / 1e6:.1f}M | {r['loss'][0]:.4f} | {r['loss'][end_i]:.4f} | "
            f"{fmt(at_tokens) if r is not dense else '-'} | {fmt(at_flops) if r is not dense else '-'} | "
            f"{fmt(ct.get('crosses_at'), '{:,.0f}') if ct else '-'} | "
            f"{fmt(cf.get('crosses_at'), '{:.3g}') if cf else '-'} | "
            + (f"{rt['load_max']:.2f}/{rt['load_min']:.2f} | {rt['router_entropy_first']:.3f} -> "
               f"{rt['router_entropy']:.3f} | {rt['dead_experts']} | "
               f"{sum(spread['start']) / len(spread['start']):.4f} -> {sum(last_spread) / len(last_spread):.4f} | "
               if rt else "- | - | - | - | ")
            + f"{r['mlp_moved']['each']:.3f} / {r['mlp_moved']['mean']:.3f} | "
            f"{r['wall_s']:,.0f} | {r['tokens_per_s']:,.0f} |")
    lines += ["", "Held-out loss at the MoE budget; 'dense at the same FLOPs' reads the (longer) dense curve at the "
              "MoE branch's training FLOPs. 'crosses dense': the first evaluation from which the MoE stays below "
              "the dense curve (n/a: it does not, within the budget). Expert spread: RMS distance of the experts "
              "from their mean over the mean's norm, averaged over MoE layers, at the start and the end. MLP "
              "moved: how far the upcycled layers' MLP weights moved over the branch, over their norm: each expert "
              "on average / the experts' mean (the dense branch: its MLPs in those layers).",
              "", f"![held-out loss]({os.path.basename(plot)})"]
    return "\n".join(lines)


def plot_curves(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in results if r["branch"] == "dense")
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, axis, label in ((axes[0], "tokens", "tokens since the branch point"),
                            (axes[1], "flops", "training FLOPs since the branch point")):
        for r in results:
            style = dict(color="black", lw=2) if r is dense else dict(lw=1.3)
            ax.plot(r[axis], r["loss"], marker="o" if len(r[axis]) == 1 else None, label=r["branch"], **style)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    axes[0].legend()
    # The differences are small beside the common descent: the gap to dense, at the same tokens.
    ax = axes[2]
    ax.axhline(0, color="black", lw=2, label="dense")
    for r in results:
        if r is not dense:
            gaps = crossing(dense, r, "tokens")["gaps"]
            ax.plot([g[0] for g in gaps], [g[1] for g in gaps], marker=".", lw=1.3, label=r["branch"])
    ax.set_xlabel("tokens since the branch point")
    ax.set_ylabel("held-out loss - dense's at the same tokens")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/when-upcycling-pays")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a tiny smoke run of the whole pipeline (CI)")
    mode.add_argument("--gpu", action="store_true", help="the SmolLM2-135M preset for one GPU")
    ap.add_argument("--branches", nargs="+", choices=sorted(BRANCHES), help="branches to run (default: the preset's)")
    ap.add_argument("--plot", help="write the figure here too (e.g. docs/when_upcycling_pays.png)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override preset fields, e.g. branch_steps=200 router_lr_mult=1")
    a = ap.parse_args(argv)

    from upcycle.errors import UpcycleError

    name = "quick" if a.quick else "gpu" if a.gpu else "cpu"
    p = PRESETS[name]
    try:
        fields = {f.name: f.type for f in dataclasses.fields(Preset)}
        for kv in a.set:
            k, _, v = kv.partition("=")
            if k not in fields or not v:
                raise UpcycleError(f"--set {kv!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
            cur = getattr(p, k)
            p = dataclasses.replace(p, **{k: type(cur)(v) if cur is not None else v})
        if a.branches:
            p = dataclasses.replace(p, branches=tuple(a.branches))
        if "dense" not in p.branches:
            raise UpcycleError("--branches must include dense (every branch is compared with it)")
        # The settings are part of the study: a run directory made with others is refused, not
        # mixed. Only branch_steps may grow: the branches then continue where they stopped.
        os.makedirs(a.out, exist_ok=True)
        settings = {"preset": name, **dataclasses.asdict(p), "seed": a.seed}
        settings.pop("branches")
        stamp = os.path.join(a.out, "study.json")
        if os.path.isfile(stamp):
            old = json.load(open(stamp))
            if {**old, "branch_steps": 0} != {**settings, "branch_steps": 0}:
                raise UpcycleError(f"{a.out} holds a study with other settings ({stamp}); use another --out")
            if p.branch_steps < old["branch_steps"]:
                raise UpcycleError(f"{a.out} holds a study of {old['branch_steps']} branch steps; it can be "
                                   f"extended, not shortened to {p.branch_steps}")
        with open(stamp, "w") as f:
            json.dump(settings, f, indent=2)

        t0 = time.perf_counter()
        init = None
        if not p.base_model:
            build_corpus(a.out, p)
            init = build_init(a.out, p, a.seed)
        else:
            build_corpus(a.out, p)
        start = base_stage(a.out, p, init, a.seed)
        results = []
        for b in p.branches:
            log(f"branch {b}")
            branch_stage(a.out, p, b, start, a.seed)
            results.append(measure(a.out, p, b, start))
    except UpcycleError as e:
        raise SystemExit(f"error: {e}") from None
    dense = next(r for r in results if r["branch"] == "dense")
    results.sort(key=lambda r: r is not dense)
    env = {"date": time.strftime("%Y-%m-%d"), "cpus": torch.get_num_threads(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})",
           "preset": name, "base": p.base_model or f"{p.layers}x{p.hidden} Llama from scratch, {p.base_steps} steps",
           "wall_s": round(time.perf_counter() - t0, 1)}
    plot = os.path.join(a.out, "when_upcycling_pays.png")
    plot_curves(results, plot, f"Dense vs upcycled continuations ({env['base']})")
    if a.plot:
        shutil.copyfile(plot, a.plot)
    text = report(a.out, p, results, env, a.plot or plot)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"env": env, "settings": settings, "results": results,
                   "crossings": {r["branch"]: {ax: crossing(dense, r, ax) for ax in ("tokens", "flops")}
                                 for r in results if r is not dense}}, f, indent=2)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
