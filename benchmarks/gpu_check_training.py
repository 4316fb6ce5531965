"""Stage 5 of ``gpu_check.py``: 20 bf16 training steps per recipe and experts backend on an upcycled SmolLM2.

    python benchmarks/gpu_check.py --stages training

The model is SmolLM2-135M's architecture with random weights (the real one ships as a GGUF,
which the GPU machine can neither receive, at 94 MiB, nor read, without ``gguf``), upcycled
with ``upcycle.convert``: last 6 MLPs -> 32 experts, top-2. The trainer is the project's
engine (``upcycle.train.Trainer``, recipes ``continued_pretraining`` and ``qlora_sft``)
fed synthetic token rows, so neither ``datasets`` nor a corpus is needed.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

def _smollm2_config(smoke: bool):
    """SmolLM2-135M's architecture (Llama: 30 layers, D=576, F=1536, 9 heads, 3 KV heads, vocab 49152,
    tied embeddings); with ``smoke`` a tiny one of the same form."""
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def _tokenizer():
    """A character-level tokenizer with a pad and an EOS (the trainer pads with it); the training rows
    below are token ids already, so its vocabulary need not cover the model's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<|pad|>", "<|bos|>", "<|endoftext|>", "<|unk|>"]
                                         + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|endoftext|>", unk_token="<|unk|>")


def build_upcycled(work: Path, smoke: bool) -> str:
    """A random SmolLM2-135M, saved, then upcycled (last 6 MLPs -> 32 experts; smoke: 1 -> 4) with ``upcycle.convert``."""
    import torch
    from transformers import AutoModelForCausalLM

    import upcycle

    torch.manual_seed(0)
    dense, moe = work / "smollm2-random", work / "smollm2-random-moe"
    AutoModelForCausalLM.from_config(_smollm2_config(smoke)).save_pretrained(dense)
    _tokenizer().save_pretrained(dense)
    upcycle.convert(upcycle.ConvertConfig(out=str(moe), model=str(dense), layers=1 if smoke else 6, progress=False,
                                          moe=upcycle.MoEConfig(num_experts=4 if smoke else 32)))
    return str(moe)


def token_rows(n: int, seq_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Synthetic, learnable sequences: a random 16-token phrase repeated (copying it is learnt within
    a few steps, so the loss moves). Ids avoid the tokenizer's specials (0-3)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(4, vocab, (n, 16), generator=g)
    return phrases.repeat(1, -(-seq_len // 16))[:, :seq_len].tolist()


class TokenRows:
    """The part of a ``datasets.Dataset`` the trainer reads: len, rows, and a numpy view of a column."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if key == "labels":
            import numpy as np

            return [np.asarray(r) for r in self.rows]
        return {"input_ids": self.rows[key], "labels": self.rows[key]}

    def with_format(self, _format):
        return self


def trainer_on_rows(recipe: str, overrides: list[str], rows: list[list[int]]):
    """An ``upcycle.train.Trainer`` for a recipe whose training data are ``rows`` (no ``datasets``, no files).

    upcycle-internal: the trainer builds its data with ``upcycle.data.build_datasets``; it is
    replaced while the trainer is constructed.
    """
    import upcycle.data
    from upcycle.train import Trainer, load_recipe

    cfg = load_recipe(recipe, overrides)
    report = {"kind": "tokens", "seq_len": len(rows[0]), "train": {"source": "synthetic token rows",
                                                                   "sequences": len(rows)}, "eval": None}
    real = upcycle.data.build_datasets
    upcycle.data.build_datasets = lambda *a, **k: (TokenRows(rows), None, report)
    try:
        return Trainer(cfg)
    finally:
        upcycle.data.build_datasets = real


def _train_run(recipe: str, model: str, out: Path, backend: str, ctx: dict) -> dict:
    import torch

    smoke, cuda = ctx["smoke"], ctx["cuda"]
    steps, batch, micro, seq = (2, 2, 2, 32) if smoke else (20, 16, 8, 1024)
    overrides = [f"model={model}", f"out={out}", f"max_steps={steps}", f"batch_size={batch}",
                 f"micro_batch_size={micro}", f"data.seq_len={seq}", f"experts_backend={backend}",
                 f"precision={'bf16' if cuda else 'fp32'}", f"device={'cuda' if cuda else 'cpu'}", "progress=false",
                 "tensorboard=false", "overwrite=true"]
    if not _has_bitsandbytes():  # qlora_sft's paged 8-bit AdamW needs it; the GPU machine may lack it
        overrides.append("optim.name=adamw")
    vocab = 256 if smoke else 49152
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = trainer_on_rows(recipe, overrides, token_rows(steps * batch, seq, vocab, seed=0))
    setup_s = time.perf_counter() - t0
    losses, times = [], []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            r = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(r["lm_loss"])
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()
    steady = sorted(times[3:] or times)[len(times[3:] or times) // 2]  # median, after autotuning's first steps
    row = {"recipe": recipe, "backend": backend, "steps": steps, "tokens_per_step": batch * seq,
           "setup_s": round(setup_s, 1), "first_step_s": round(times[0], 2), "median_step_s": round(steady, 3),
           "tokens_per_s": round(batch * seq / steady), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
           if cuda else None, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses}
    del trainer
    return row


def stage_training(st, ctx: dict) -> None:
    """``st``: the ``gpu_check.Stage`` to fill; ``ctx``: cuda, smoke, work."""
    work = Path(ctx["work"])
    t0 = time.perf_counter()
    model = build_upcycled(work, ctx["smoke"])
    st.data["model"] = (f"random-init SmolLM2-135M architecture{' (smoke: tiny)' if ctx['smoke'] else ''}, "
                        f"upcycled with upcycle.convert in {time.perf_counter() - t0:.0f} s; data: synthetic token rows "
                        "(random 16-token phrases repeated), no datasets library, no tokenisation")
    for recipe in ("continued_pretraining", "qlora_sft"):
        runs = {}
        for backend in ("triton", "grouped_mm"):
            if st.out_of_time(f"{recipe} {backend}"):
                break
            try:
                runs[backend] = _train_run(recipe, model, work / f"{recipe}-{backend}", backend, ctx)
                st.rows.append(runs[backend])
            except Exception as e:
                st.status, st.reason = "failed", f"{recipe} {backend}: {_one_line(e)}"
                st.rows.append({"recipe": recipe, "backend": backend, "error": _one_line(e)})
            gc.collect()
        if len(runs) == 2:
            a, b = runs["triton"]["losses"], runs["grouped_mm"]["losses"]
            rel = max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a, b))
            # bf16 autocast through two different experts kernels: the same run to ~1e-2 over 20 steps.
            agree = rel <= 2e-2
            st.notes.append(f"{recipe}: losses triton vs grouped_mm, max relative difference over "
                            f"{len(a)} steps {rel:.2e} ({'agree' if agree else 'DISAGREE'}, bound 2e-2)")
            if not agree:
                st.status, st.reason = "failed", f"{recipe}: losses of the two backends disagree ({rel:.2e})"
    st.notes.append("qlora_sft optimizer: " + ("the recipe's paged_adamw_8bit (bitsandbytes)" if _has_bitsandbytes()
                    else "adamw (bitsandbytes is not installed here; the recipe asks for paged_adamw_8bit)"))
    st.notes.append("qlora_sft: experts with LoRA take the grouped_mm path under either backend (the fused kernels "
                    "have no LoRA epilogue yet), so its two runs run the same experts code; they measure the NF4 "
                    "(blocks of experts dequantised by the dequant kernel) + LoRA step, not the triton GEMMs")
    st.notes.append("continued_pretraining under bf16 autocast keeps fp32 master weights, and the triton experts "
                    "compute in the weights' dtype: its triton run times the fp32 (ieee) kernels")


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
