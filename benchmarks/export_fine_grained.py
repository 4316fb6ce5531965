"""A fine-grained upcycle with a shared expert, exported to Qwen2-MoE and loaded by stock transformers.

    python benchmarks/export_fine_grained.py --out runs/export-fg

SmolLM2-135M-Instruct (the embedded model), last 6 MLPs as 8 copies x 4 segments (32 experts of 288,
top-4: one copy's worth, the dense model's FLOPs) plus a shared expert of a quarter of the neurons
(384, chosen by activation on the embedded text). ``upcycle export`` writes ``qwen2_moe``; a process
that never imports upcycle loads it with ``AutoModelForCausalLM`` and its logits and greedy tokens
on a chat prompt are compared with ``upcycle.load`` of the source and with the dense model (t=0).
Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main as cli
from upcycle.models.sources import open_source

STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM
path, ids_file, out_file, n = sys.argv[1:]
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    logits = m(input_ids=ids).logits
    greedy = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(n), do_sample=False)
torch.save(dict(logits=logits, greedy=greedy,
                upcycle=any(k.split(".")[0] in ("upcycle", "upcycle_kernels") for k in sys.modules)), out_file)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/export-fg")
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    moe_dir, q_dir = os.path.join(a.out, "moe"), os.path.join(a.out, "qwen2_moe")
    t = time.perf_counter()
    upcycle.convert(ConvertConfig(out=moe_dir, layers=6, shared_fraction=0.25, calibration_tokens=1024, overwrite=True,
                                  moe=MoEConfig(num_experts=32, granularity=4, top_k=4), progress=False))
    t_convert = time.perf_counter() - t
    t = time.perf_counter()
    if cli(["export", moe_dir, "--format", "qwen2_moe", "--out", q_dir, "--no-progress", "--overwrite"]) != 0:
        sys.exit("export failed")
    t_export = time.perf_counter() - t
    with open_source("smollm2-135m") as src:
        dense, tok = src.load_dense_model(), src.load_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is a sonnet?"}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    ids_file, got_file = os.path.join(a.out, "ids.pt"), os.path.join(a.out, "stock.pt")
    torch.save(ids, ids_file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # stock transformers, no upcycle
    subprocess.run([sys.executable, "-c", STOCK, q_dir, ids_file, got_file, str(a.new_tokens)], check=True, env=env,
                   cwd=a.out)
    got = torch.load(got_file)
    cfg = json.load(open(os.path.join(q_dir, "config.json")))
    size = sum(os.path.getsize(os.path.join(q_dir, f)) for f in os.listdir(q_dir))
    print(f"convert {t_convert:.1f} s, export {t_export:.1f} s, {size / 1e9:.2f} GB; num_experts {cfg['num_experts']}, "
          f"top-{cfg['num_experts_per_tok']}, moe_intermediate_size {cfg['moe_intermediate_size']}, "
          f"shared_expert_intermediate_size {cfg['shared_expert_intermediate_size']}; upcycle imported by the "
          f"stock process: {got['upcycle']}")
    print(f"| stock Qwen2MoeForCausalLM vs | max abs logit difference | logit scale | {a.new_tokens} greedy tokens |")
    print("|---|---|---|---|")
    ours = upcycle.load(moe_dir, experts_backend="loop")
    with torch.no_grad():
        for name, model in (("upcycle.load", ours), ("dense SmolLM2 (t=0)", dense)):
            logits = model(input_ids=ids).logits
            greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                    do_sample=False)
            same = "same" if got["greedy"].tolist() == greedy.tolist() else "DIFFER"
            print(f"| {name} | {(got['logits'] - logits).abs().max().item():.3g} | "
                  f"{logits.abs().max().item():.3g} | {same} |")
    print("stock greedy:", repr(tok.decode(got["greedy"][0, ids.shape[1]:])))


if __name__ == "__main__":
    main()
