"""Streaming conversion benchmark: peak memory and throughput on a synthetic multi-GB checkpoint.

    python benchmarks/convert_streaming.py [--gb 3.5] [--experts 4] [--layers 4] [--workdir /tmp/upcycle-bench]

Writes a random Llama-shaped checkpoint (sharded safetensors, fp32) of about ``--gb`` GB,
converts it with ``upcycle convert`` in a child process, and prints a table: input and
output sizes, the largest input shard, one layer's experts, time, MB/s and the child's peak
RSS (and the RSS of merely importing upcycle, for scale). The claim being checked: peak
memory is about the largest input shard plus one layer's experts, not the output model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

D, F, VOCAB = 2048, 8192, 32000


def _layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}"
    return {
        f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
        f"{p}.self_attn.q_proj.weight": (D, D), f"{p}.self_attn.k_proj.weight": (D, D),
        f"{p}.self_attn.v_proj.weight": (D, D), f"{p}.self_attn.o_proj.weight": (D, D),
        f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D), f"{p}.mlp.down_proj.weight": (D, F),
    }


def write_synthetic(path: str, gb: float, shard_bytes: int) -> tuple[int, int, int]:
    """A Llama-shaped fp32 checkpoint of about ``gb`` GB; returns (layers, bytes, largest shard)."""
    per_layer = sum(torch.Size(s).numel() * 4 for s in _layer_tensors(0).values())
    fixed = (2 * VOCAB * D + D) * 4
    layers = max(2, round((gb * 1e9 - fixed) / per_layer))
    os.makedirs(path, exist_ok=True)
    specs = {"model.embed_tokens.weight": (VOCAB, D)}
    for i in range(layers):
        specs.update(_layer_tensors(i))
    specs.update({"model.norm.weight": (D,), "lm_head.weight": (VOCAB, D)})
    shards, cur, size = [], {}, 0
    for name, shape in specs.items():
        nbytes = torch.Size(shape).numel() * 4
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = shape
        size += nbytes
    shards.append(cur)
    weight_map, total, largest = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in shard.items()}
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        nbytes = sum(t.numel() * 4 for t in tensors.values())
        total += nbytes
        largest = max(largest, nbytes)
        weight_map.update({n: fname for n in shard})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": D,
              "intermediate_size": F, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, "hidden_act": "silu", "rms_norm_eps": 1e-5}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return layers, total, largest


def _child_rss_mb(cmd: list[str]) -> tuple[float, str, float]:
    """Run ``cmd``; (peak RSS of the child in MB, sampled every 20 ms; its stdout; seconds).

    Sampled rather than read from ru_maxrss: Linux carries the parent's high-water mark
    across fork + exec, so a child's ru_maxrss would include this script's own footprint.
    """
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return peak / 2**20, out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.5)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--workdir", default="/tmp/upcycle-bench")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    src, out = os.path.join(a.workdir, "dense"), os.path.join(a.workdir, "moe")
    shutil.rmtree(a.workdir, ignore_errors=True)
    t0 = time.perf_counter()
    n_layers, in_bytes, largest = write_synthetic(src, a.gb, int(a.shard_gb * 1e9))
    print(f"wrote synthetic checkpoint: {n_layers} layers, {in_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
          flush=True)
    import_rss, _, _ = _child_rss_mb([sys.executable, "-c", "import upcycle, upcycle.surgery.convert"])
    rss, stdout, wall = _child_rss_mb([sys.executable, "-m", "upcycle", "convert", "--model", src, "--out", out,
                                       "--layers", str(a.layers), "--experts", str(a.experts), "--json",
                                       "--no-progress"])
    r = json.loads(stdout.strip().splitlines()[-1])
    experts_layer = a.experts * 3 * D * F * 4
    rows = [
        ("input checkpoint", f"{in_bytes / 1e9:.2f} GB ({n_layers} layers, D={D}, F={F}, fp32)"),
        ("largest input shard", f"{largest / 1e6:.0f} MB"),
        ("one layer's experts", f"{experts_layer / 1e6:.0f} MB ({a.experts} x SwiGLU MLP)"),
        ("output checkpoint", f"{r['gigabytes']:.2f} GB ({a.layers} MoE layers x {a.experts} experts)"),
        ("conversion time", f"{r['seconds']:.1f} s (process wall {wall:.1f} s)"),
        ("throughput", f"{r['mb_per_s']:.0f} MB/s written"),
        ("peak RSS, convert", f"{rss:.0f} MB"),
        ("peak RSS, import only", f"{import_rss:.0f} MB"),
        ("peak RSS above import", f"{rss - import_rss:.0f} MB"),
    ]
    print(f"\nupcycle convert streaming benchmark -- {platform.node()} ({os.cpu_count()} CPUs), "
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}")
    print(f"| {'what':<22} | {'value':<55} |\n|{'-' * 24}|{'-' * 57}|")
    for k, v in rows:
        print(f"| {k:<22} | {v:<55} |")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
