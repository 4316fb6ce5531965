"""``upcycle export``: an upcycled checkpoint as a stock MoE checkpoint or a llama.cpp GGUF file.

    upcycle export runs/cpt/checkpoints/step-000300 --format qwen2_moe --out runs/served
    vllm serve runs/served                                  # or transformers: no `import upcycle`
    upcycle export runs/smollm2-moe --format gguf --outtype q8_0 --out runs/smollm2-moe.gguf
    llama-cli -m runs/smollm2-moe.gguf

Only what the target defines is written, and nothing is approximated: every feature the
target cannot express (expert choice, a non-gated MLP, biases it lacks, QK-norm, a head size
other than hidden / heads, sliding windows it does not model...) is refused in one line
before anything is written. ``--all-moe`` turns each dense layer into E identical experts
(``export_plan``) for engines that need MoE in every layer. After writing, ``export`` says
which engines serve the result exactly and which must not be used (``engines.TABLE``).

Tensors stream from the source into the output one at a time (an adapter is merged into its
base in memory first); the output is written beside its destination and renamed when
complete. Where it came from (source, fingerprint, tool version) goes into the shards'
metadata and a README.md beside them (GGUF: ``general.*`` fields), not into config.json.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from upcycle.errors import UpcycleError
from upcycle.io import atomic_dir, atomic_path, read_model_config
from upcycle.models.sources import open_source
from upcycle.surgery.engines import serving_lines
from upcycle.surgery.export_plan import ExportFacts
from upcycle.surgery.hf_targets import (
    HF_FORMATS,
    check_against_transformers,
    resolve_format,
    stock_config,
    stock_expert_width,
    stock_pieces,
)
from upcycle.surgery.writer import ShardWriter, TensorSpec, plan_shards, shard_file_names, write_index
from upcycle.version import __version__

FORMATS = ("auto", *HF_FORMATS, "gguf")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    """Arguments of ``upcycle export``."""

    src: str
    """An upcycled checkpoint directory, or a LoRA adapter directory (merged into its base on the way)."""
    out: str
    """Output directory (a .gguf file for ``--format gguf``)."""
    format: str = "auto"
    """``qwen2_moe``, ``qwen3_moe``, ``mixtral`` (every layer MoE), ``gguf``, or ``auto`` (qwen3_moe for a
    Qwen3 base, Mixtral when every layer is MoE, else qwen2_moe)."""
    all_moe: bool = False
    """Make every dense layer MoE: E identical copies of its MLP under a zero router (exact; costs (E-1)x
    those MLPs' weights). For engines that need MoE in every layer (SGLang, llama.cpp's ``llama``)."""
    dtype: str | None = None
    """Safetensors formats: float32, bfloat16 or float16; None keeps the source's."""
    outtype: str | None = None
    """GGUF: f32, f16, bf16 or q8_0 (default: f16 for a 16-bit source, else f32)."""
    max_shard_size: int = 2 * 1024**3
    overwrite: bool = False
    progress: bool = True


@dataclass
class ExportResult:
    out: str
    format: str
    architecture: str
    moe_layers: list[int]
    copied_layers: list[int]
    """Layers made MoE by ``--all-moe`` (E copies of their dense MLP)."""
    bytes_written: int
    seconds: float
    engines: list[str] = field(default_factory=list)
    """Which engines serve the result exactly, and which must not be used."""


def export(cfg: ExportConfig) -> ExportResult:
    """Write ``cfg.src`` as ``cfg.format`` at ``cfg.out`` (see the module docstring)."""
    t0 = time.perf_counter()
    if cfg.format not in FORMATS:
        raise UpcycleError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    gguf = cfg.format == "gguf"
    if cfg.dtype is not None and (gguf or cfg.dtype not in DTYPES):
        raise UpcycleError("--dtype is for the safetensors formats; a GGUF takes --outtype" if gguf else
                           f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.outtype is not None and (not gguf or cfg.outtype not in OUTTYPES):
        raise UpcycleError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {cfg.outtype!r}" if gguf else
                           "--outtype is for --format gguf; the safetensors formats take --dtype")
    out = os.path.abspath(cfg.out)
    if os.path.exists(out) and not cfg.overwrite:
        raise UpcycleError(f"output {cfg.out} already exists (pass --overwrite to replace it)")
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(cfg.src):
        raise UpcycleError(f"--out {cfg.out} is the source itself; choose another output")
    if gguf and os.path.isdir(out):
        raise UpcycleError(f"--out {cfg.out} is a directory; a GGUF export is one file (e.g. {cfg.out}/model.gguf)")
    # What can be refused is refused before an adapter is merged, and all of it before a byte is written.
    early = _upcycled_config(cfg.src)
    if early is not None:
        _facts(early, cfg)
    with _resolved(cfg.src, out) as (src_dir, origin), open_source(src_dir) as src:
        facts = _facts(read_model_config(src_dir), cfg)
        facts.check_tensors(src)
        if gguf:
            from upcycle.surgery.gguf_export import write_gguf

            fmt = "gguf"
            with atomic_path(out) as tmp:
                arch, total = write_gguf(src, facts, tmp, outtype=cfg.outtype, origin=origin, progress=cfg.progress)
        else:
            fmt = resolve_format(facts, cfg.format)
            arch, total = _write_stock(src, facts, fmt, cfg, out, origin)
        dtype = None if gguf else (DTYPES[cfg.dtype] if cfg.dtype else src.default_dtype)
    return ExportResult(out=cfg.out, format=fmt, architecture=arch, moe_layers=list(facts.moe_layers),
                        copied_layers=list(facts.copied_layers), bytes_written=total,
                        seconds=time.perf_counter() - t0,
                        engines=serving_lines(fmt, *_kinds(facts)) + _routing_note(facts, dtype))


def _kinds(facts: ExportFacts) -> tuple[str, ...]:
    """The engine table's columns that apply to ``facts`` (an engine must serve every one of them)."""
    return (("all-moe" if facts.all_moe else "partial",) + (("fine-grained",) if facts.moe.granularity > 1 else ())
            + (("shared",) if facts.shared_ffn else ()))


def _routing_note(facts: ExportFacts, dtype: torch.dtype | None) -> list[str]:
    """A fine-grained export in 16 bits: its engines route in that dtype, where two copies' logits can round
    to the same value and a token's top-(K·G) then mixes their segments (docs/benchmarks.md measures it)."""
    G = facts.moe.granularity
    if G == 1 or dtype not in (torch.bfloat16, torch.float16):
        return []
    name = str(dtype).removeprefix("torch.")
    return [f"note: engines route a {name} checkpoint in {name}, where logits of two copies can round to the "
            f"same value and a token's top-{facts.moe.top_k} then mixes segments of both (upcycle routes in "
            "float32); export in float32 for the exact routing (README, 'upcycle export')"]


def _facts(raw: dict, cfg: ExportConfig) -> ExportFacts:
    """The export's facts, every refusal of the format included (nothing is written yet)."""
    facts = ExportFacts.of(raw)
    facts = facts.with_all_moe() if cfg.all_moe else facts
    if cfg.format == "gguf":
        from upcycle.surgery.gguf_export import plan_gguf

        plan_gguf(facts)
    else:
        stock_config(facts, resolve_format(facts, cfg.format))
    return facts


def _write_stock(src, facts: ExportFacts, fmt: str, cfg: ExportConfig, out: str, origin: str) -> tuple[str, int]:
    config = stock_config(facts, fmt)
    pieces = stock_pieces(facts, fmt, lambda n: src.tensor_info(n)[0])
    check_against_transformers(config, pieces)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else src.default_dtype
    specs = [TensorSpec(p.name, p.shape, dtype) for p in pieces]
    by_name = {p.name: p for p in pieces}
    shards = plan_shards(specs, cfg.max_shard_size)
    total = sum(s.nbytes for s in specs)
    meta = {"format": "pt", "upcycle_version": __version__, "exported_from": origin,
            "source_fingerprint": src.fingerprint}
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, desc="exporting", disable=not cfg.progress) as bar:
        files = shard_file_names(len(shards))
        cache: dict[str, torch.Tensor] = {}  # the one source tensor being sliced (an expert stack)
        for group, fname in zip(shards, files):
            writer = ShardWriter(os.path.join(tmp, fname), group, metadata=meta)
            try:
                for spec in group:
                    piece = by_name[spec.name]
                    if piece.source is not None and piece.source not in cache:
                        cache.clear()
                        cache[piece.source] = src.get_tensor(piece.source)
                    t = piece.value(cache.get(piece.source))
                    bar.update(writer.write(spec.name, _cast(spec.name, t, spec.dtype)))
            except BaseException:
                writer.abort()
                raise
            writer.close()
        write_index(tmp, shards, files)
        config.dtype = dtype
        config.save_pretrained(tmp)
        if fmt == "qwen3_moe":
            _add_legacy_expert_count(tmp, facts.moe.num_experts)
        src.save_tokenizer(tmp)
        src.generation_config().save_pretrained(tmp)
        _write_readme(tmp, fmt, origin, src.fingerprint, facts)
    return config.architectures[0], total


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; UpcycleError where that overflows (float16 holds up to 65504; a Qwen2-MoE shared
    expert's down_proj is written doubled). Raised mid-write, the output directory is never put in place."""
    out = t.to(dtype)
    if out.is_floating_point() and torch.isinf(out).any() and not torch.isinf(t).any():
        raise UpcycleError(f"cannot export {name} as {str(dtype).removeprefix('torch.')}: its largest value "
                           f"{t.abs().max().item():.4g} overflows it (largest {torch.finfo(dtype).max:.4g}"
                           + ("; the shared expert's down_proj is written doubled" if ".shared_expert.down_proj" in name
                              else "") + "); export in float32 or bfloat16")
    return out


def _add_legacy_expert_count(folder: str, num_experts: int) -> None:
    """transformers >= 5.20 saves Qwen3-MoE's expert count as ``num_local_experts`` only; engines and older
    transformers read ``num_experts`` (the published Qwen3-MoE configs' key) and would otherwise take their
    default of 128. Both keys, same value."""
    import json

    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["num_experts"] = num_experts
    with open(path, "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
        f.write("\n")


def _upcycled_config(spec: str) -> dict | None:
    """config.json of the checkpoint ``spec`` exports; for an adapter, its recorded base's when that is a
    local upcycled checkpoint (None: known only once merged)."""
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        from upcycle.adapters.peft_io import read_adapter_config

        base = read_adapter_config(spec).get("base_model_name_or_path")
        if base and os.path.isfile(os.path.join(base, "config.json")) and "upcycle" in read_model_config(base):
            return read_model_config(base)
        return None
    if not os.path.isdir(spec):
        raise UpcycleError(f"checkpoint not found: {spec}")
    raw = read_model_config(spec)
    if "upcycle" not in raw:
        raise UpcycleError(f"{spec} is not an upcycled checkpoint (no 'upcycle' section in config.json); "
                           "export writes MoE checkpoints made by upcycle convert")
    return raw


@contextmanager
def _resolved(spec: str, out: str):
    """(upcycled checkpoint dir, description of the source): ``spec`` itself, or, for an adapter, its
    base with the adapter merged in, written beside ``out`` for the export's duration."""
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        from upcycle.adapters.merge import merge_command

        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.merging-", dir=parent)
        try:
            merged = merge_command(spec, os.path.join(tmp, "merged"))
            if not merged["upcycled"]:
                raise UpcycleError(f"adapter {spec} applies to a dense model ({merged['base']}): nothing to export "
                                   "as MoE")
            yield merged["out"], f"{os.path.abspath(spec)} (LoRA adapter) merged into {merged['base']}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    yield spec, os.path.abspath(spec)


def _shape_line(facts: ExportFacts) -> str:
    moe, out = facts.moe, ""
    if moe.granularity > 1:
        out += (f"\n* fine-grained: {moe.num_copies} copies of each MLP x {moe.granularity} segments of {facts.ffn} "
                f"neurons; a copy's segments share one router row, so top-{moe.top_k} takes "
                f"{moe.top_k // moe.granularity} whole {'copy' if moe.top_k == moe.granularity else 'copies'}")
    width = stock_expert_width(facts)
    if width > facts.ffn:
        out += (f"\n* experts written {width} wide: {facts.ffn} neurons and {width - facts.ffn} zero ones (exactly 0), "
                "for the 16-byte rows transformers' grouped_mm experts need")
    if facts.shared_ffn:
        out += (f"\n* shared expert: {facts.shared_ffn} neurons, always on; `shared_expert_gate` is zero (sigmoid(0) "
                "= 1/2) and its `down_proj` is stored doubled, so it adds exactly its weight-1 output")
    return out


def _write_readme(tmp: str, fmt: str, origin: str, fingerprint: str, facts: ExportFacts) -> None:
    moe, up = facts.moe, facts.raw["upcycle"]
    copied = (f"; layers {', '.join(map(str, facts.copied_layers))} are {moe.num_experts} identical copies of "
              "their dense MLP (--all-moe)") if facts.copied_layers else ""
    engines = "\n".join(f"* {line}" for line in serving_lines(fmt, *_kinds(facts)))
    text = f"""# Exported by upcycle {__version__}

A stock `{fmt}` checkpoint: it loads without `upcycle`.

{engines}

* source: `{origin}` (fingerprint `{fingerprint}`)
* upcycled from: `{up['source']['model']}` ({facts.family})
* MoE layers: {', '.join(map(str, facts.moe_layers))} of {facts.num_layers}{copied}; {moe.num_experts} experts, \
top-{moe.top_k} routing{' (weights renormalised)' if moe.normalize_topk else ''}{_shape_line(facts)}
"""
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
