"""When does upcycling pay? A dense base trained from scratch, then dense vs upcycled continuations.

    python benchmarks/when_upcycling_pays.py --out runs/pays             # the CPU study (hours, 2 cores)
    python benchmarks/when_upcycling_pays.py --out runs/pays --branches dense fg-E8G4@s2 dense@s2   # add to it
    python benchmarks/when_upcycling_pays.py --quick --out runs/pays-q   # the pipeline only (a few minutes)
    python benchmarks/when_upcycling_pays.py --gpu --out runs/pays-gpu   # SmolLM2-135M base, one GPU

``--gpu`` needs the project's dependencies (``datasets``, ``gguf``) and the offline text
packages on the GPU machine: not the lent H200 image, which lacks both and cannot receive the
94 MiB GGUF; results from it are not recorded yet.

Stages, each a directory under OUT (a killed study continues where it stopped; a finished
stage is skipped, so naming more branches runs only the new ones; ``--set branch_steps=N`` with a
larger N extends a finished study):

1. ``corpus/``: the offline English text (``upcycle.data.corpora.english_files``): train
   documents, and held-out documents no stage trains on; ``init/``: a byte-level BPE tokenizer
   trained on the train documents and a randomly initialised Llama (``--gpu``: the embedded
   SmolLM2-135M and its tokenizer instead, no base stage).
2. ``base/``: ``upcycle train`` of the dense model from scratch (warmup, then cosine to 0.1 of
   the peak: a finished, annealed model, as continued pretraining starts from; ``--set
   base_decay=constant`` branches mid-training instead, docs part 1).
3. ``branches/NAME/``: from the base's last checkpoint, each branch upcycles it
   (``upcycle convert``, the last half of the layers; ``models/NAME/``) or keeps it dense, and
   continues with ``upcycle train`` on the same tokens in the same order, same learning rates, a
   fresh optimizer. The dense branch runs longer, so that it can be read at the FLOPs of the MoE
   branches too. ``NAME@sN`` (N >= 1) is branch NAME with seed N: its own data order (the
   trainer's shuffle) and, for an upcycle, its own router initialisation (and permutations,
   re-drawn columns, a random shared set: whatever ``upcycle convert --seed`` draws); the base is
   the same. Each branch is compared with the dense branch of its seed, so ``X@sN`` needs
   ``dense@sN``.
4. ``results.json`` / ``report.md`` / the plot (``when_upcycling_pays_report``): held-out loss
   at equal tokens and at equal training FLOPs against the same seed's dense branch (and the
   mean over seeds), de-grouping over training for fine-grained branches, the routing telemetry
   of the last logging window, how far the copies moved apart, and wall time; every branch
   finished in OUT at this budget is reported, whether named this time or before.
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
from when_upcycling_pays_report import SEED_SEP, dense_of, measure, plot_curves, report, split_name


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
                    branches=("dense", "top2-E8", "drop-E8", "ec-C2-E8", "fg-E8G4-shared", "fg-E8G4-softmax")),
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
    # Fine-grained (He et al. 2024): 8 copies x 4 segments of a quarter MLP, top-4 segments: one copy's
    # worth per token, the dense model's FLOPs.
    "fg-E8G4": dict(num_experts=32, granularity=4, top_k=4),
    "fg-E8G4-perm": dict(num_experts=32, granularity=4, top_k=4, permute_copies=True),
    # A quarter of every MLP's neurons (the most active on the calibration text) always on, the rest
    # routed as 8 copies x 4 segments: shared + one copy's segments is the dense MLP, at its FLOPs.
    "fg-E8G4-shared": dict(num_experts=32, granularity=4, top_k=4, shared_fraction=0.25),
    # The router-order ablation: softmax over all 32, top-4, raw weights (He et al.'s softmax-then-top-K),
    # the down projections x E/K = 8 on top of G: the dense model where the router is uniform, not exact.
    "fg-E8G4-softmax": dict(num_experts=32, granularity=4, top_k=4, normalize_topk=False, weight_scaling=True),
}
_CONVERT_FIELDS = ("reinit_ratio", "expert_noise", "permute_copies", "shared_fraction", "weight_scaling")
"""Branch settings that are ``ConvertConfig``'s, not ``MoEConfig``'s."""


def check_branches(names: tuple[str, ...]) -> None:
    """Every name a known branch or ``NAME@sN`` (N >= 1), with the dense branch of every seed it uses."""
    from upcycle.errors import UpcycleError

    for name in names:
        kind, sep, rep = name.partition(SEED_SEP)
        if kind not in BRANCHES or (sep and not (rep.isdigit() and int(rep) >= 1 and str(int(rep)) == rep)):
            raise UpcycleError(f"--branches {name}: expected NAME or NAME{SEED_SEP}N (N >= 1, another seed), NAME one "
                               f"of {', '.join(BRANCHES)}")
    missing = sorted({dense_of(n) for n in names} - set(names))
    if missing:
        raise UpcycleError(f"--branches must include {' '.join(missing)}: every branch is compared with the dense "
                           "branch of its seed")


def branch_seeds(seed: int, replica: int) -> tuple[int, int]:
    """(convert seed, train seed) of a branch of the study seeded ``seed``: replica 0 is what earlier
    versions ran (the router from ``seed``, the data order from ``seed + 1``)."""
    return seed + 1000 * replica, seed + 1 + 1000 * replica


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
    """Branch ``name`` (``KIND`` or ``KIND@sN``) of the study seeded ``seed``: convert, then train."""
    import upcycle

    kind, replica = split_name(name)
    convert_seed, train_seed = branch_seeds(seed, replica)
    spec = dict(BRANCHES[kind] or {})
    router_mult = spec.pop("router_lr_mult", p.router_lr_mult)
    experts_mult = spec.pop("experts_lr_mult", 1.0)
    aux = spec.pop("aux_loss_weight", None)
    steps = _steps(p, name)
    model = start
    if spec:
        model = os.path.join(out, "models", name)
        if not os.path.isfile(os.path.join(model, "config.json")):
            init = {k: spec.pop(k) for k in _CONVERT_FIELDS if k in spec}
            layers = _num_layers(start) // 2  # the last half, as Komatsuzaki et al. (every other layer there)
            upcycle.convert(upcycle.ConvertConfig(out=model, model=start, layers=layers, moe=upcycle.MoEConfig(**spec),
                                                  seed=convert_seed, overwrite=True, progress=False, **init))
    lr = p.base_lr * p.branch_lr_mult
    overrides = [f"model={model}", f"save_every={max(p.branch_steps // 4, 1)}", f"optim.lr={lr}",
                 f"optim.experts_lr={lr * experts_mult}", f"optim.router_lr={lr * router_mult}", "schedule.decay=constant",
                 f"schedule.warmup_steps={p.branch_warmup}", *common(p, out, train_seed)]
    if aux is not None:
        overrides.append(f"aux_loss_weight={aux}")
    return run_train(os.path.join(out, "branches", name), steps, overrides)


def _steps(p: Preset, name: str) -> int:
    return math.ceil(p.branch_steps * p.dense_extra) if split_name(name)[0] == "dense" else p.branch_steps


def reported_branches(out: str, p: Preset) -> list[str]:
    """The branches named now, and every other one OUT holds finished at this budget (an earlier
    call's), in ``BRANCHES`` order, seeds ascending."""
    from upcycle.errors import UpcycleError

    names = set(p.branches)
    for path in sorted(glob.glob(os.path.join(out, "branches", "*", "summary.json"))):
        name = os.path.basename(os.path.dirname(path))
        try:
            check_branches((name, dense_of(name)))
        except UpcycleError:
            continue  # a branch this version does not know: not ours to report
        if name not in names:
            if _finished(os.path.dirname(path), _steps(p, name)):
                names.add(name)
            else:
                log(f"{name}: not reported, it ran {json.load(open(path))['steps']} of {_steps(p, name)} steps "
                    "(name it in --branches to extend it)")
    names = {n for n in names if dense_of(n) in names}
    order = list(BRANCHES)
    return sorted(names, key=lambda n: (order.index(split_name(n)[0]), split_name(n)[1]))


def _num_layers(model: str) -> int:
    from upcycle.models.sources import open_source

    with open_source(model) as src:
        return getattr(src.config, "text_config", src.config).num_hidden_layers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/when-upcycling-pays")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a tiny smoke run of the whole pipeline (CI)")
    mode.add_argument("--gpu", action="store_true", help="the SmolLM2-135M preset for one GPU")
    ap.add_argument("--branches", nargs="+", metavar="NAME[@sN]", help=(
        f"branches to run (default: the preset's), of {', '.join(BRANCHES)}; NAME@sN: with seed N >= 1"))
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
        check_branches(p.branches)
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
        for b in p.branches:
            log(f"branch {b}")
            branch_stage(a.out, p, b, start, a.seed)
    except UpcycleError as e:
        raise SystemExit(f"error: {e}") from None
    n_layers = _num_layers(start)
    results = [measure(a.out, p, b, start, n_layers, (BRANCHES[split_name(b)[0]] or {}).get("granularity", 1))
               for b in reported_branches(a.out, p)]
    env = {"date": time.strftime("%Y-%m-%d"), "cpus": torch.get_num_threads(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})",
           "preset": name, "base": p.base_model or f"{p.layers}x{p.hidden} Llama from scratch, {p.base_steps} steps",
           "wall_s": round(time.perf_counter() - t0, 1)}
    plot = os.path.join(a.out, "when_upcycling_pays.png")
    plot_curves(results, plot, f"Dense vs upcycled continuations ({env['base']})")
    if a.plot:
        shutil.copyfile(plot, a.plot)
    text, summary = report(p, results, env, a.plot or plot)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"env": env, "settings": settings, "results": results, **summary}, f, indent=2)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
