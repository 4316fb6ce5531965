"""``upcycle export --format gguf``: one GGUF file that llama.cpp runs with the upcycle's layers exact.

    upcycle export runs/smollm2-moe --format gguf --outtype q8_0 --out runs/smollm2-moe.gguf

Shape legend: E experts, F expert FFN width, D hidden size, V vocabulary, hd head size.

Which llama.cpp architecture (read in the llama.cpp that llama-cpp-python 0.3.36 vendors:
src/models/{llama,ernie4-5,ernie4-5-moe,glm4-moe}.cpp, src/llama-graph.cpp ``build_moe_ffn``):

* ``llama`` when every layer is MoE (natively or ``--all-moe``), top-K renormalised, no QK-norm,
  no shared expert: ``llama_model_llama`` builds experts in every layer once ``expert_count`` > 0,
  and its graph routes softmax -> top-K -> renormalise (``norm_w = true``) -> SwiGLU experts: our
  top-K. It is the form Mixtral GGUFs have, which every llama.cpp-based tool reads. (Its loader
  takes ``ffn_*_shexp`` tensors for Granite, but its graph never adds them: no shared expert.)
* ``ernie4_5-moe`` when the last layers are MoE (or all of them, with a shared expert), top-K
  renormalised, no QK-norm: its graph makes layer i MoE iff i >= ``leading_dense_block_count`` and
  (i + 1) % ``interleave_moe_layer_step`` == 0, with softmax gating and ``norm_w = true`` fixed, and
  adds a shared expert of ``expert_shared_feed_forward_length`` neurons with weight 1 when that is
  > 0 (any width: ours as it is). Its loader (``llama_model_ernie4_5::load_arch_tensors``) wants
  MoE tensors in every layer from the lead on, step or not, so only step 1 loads: MoE layers must
  be the last ones.
* ``glm4moe`` otherwise (top-K without renormalisation, or a Qwen3 base's QK-norm), again when the
  MoE layers are the last ones: ``leading_dense_block_count`` dense layers, then MoE with the gating
  function and ``expert_weights_norm`` from the file (softmax; our flag), optional per-head
  ``attn_q_norm`` / ``attn_k_norm`` RMSNorm before RoPE (Qwen3's). Its graph always adds a shared
  expert with weight 1, and one it does not find is not skipped: ``build_ffn`` with no weights
  returns silu(x). Its width is ``expert_shared_count`` x the experts' width, so our shared expert
  of F_s neurons is written padded with zero neurons to the next multiple of F (a zero up row and
  down column add exactly 0); without one, an all-zero shared expert of width F is written, which
  adds exactly 0 and costs one more F-wide MLP per token and layer. Its expert selection bias
  ``exp_probs_b`` (required) is written as zeros.
* anything else (MoE layers that are not the last ones, unless every layer is) is refused: ``--all-moe``.

Fine-grained upcycles (granularity G) need nothing more: E·G experts of F/G neurons, top-(K·G),
and the router stays F32 in every outtype, so a copy's G identical router rows give identical logits
in llama.cpp too and its top-(K·G) takes whole copies (tests/test_llama_cpp.py).

RoPE: ``llama`` and ``ernie4_5-moe`` rotate pairs of adjacent values (llama.cpp's NORM RoPE), where
transformers rotates the two halves of each head; their q/k rows (and q/k biases) are reordered
per head, half j -> row 2j, half j + hd/2 -> row 2j + 1, as llama.cpp's converter does for Llama.
``glm4moe`` uses NEOX RoPE, the halves as transformers has them: no reordering.

Storage: norms, biases and the router stay F32 in every outtype (routing decisions in fp32);
matrices take ``--outtype`` (q8_0 needs rows of a multiple of 32 values, else F16, as llama.cpp's
converter does). Tensors stream one at a time through ``gguf.GGUFWriter``: header and tensor
table first (every shape and type is known before any data is read), then each tensor's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from upcycle.errors import UpcycleError
from upcycle.surgery.export_plan import ExportFacts, Piece
from upcycle.version import __version__

NORM_ROPE_ARCHS = ("llama", "ernie4_5-moe")


@dataclass(frozen=True)
class GGUFPlan:
    arch: str
    """llama.cpp's architecture name."""
    lead: int
    """Leading dense layers; every layer after them is MoE."""


def _refuse(why: str) -> UpcycleError:
    return UpcycleError(f"cannot export to GGUF: {why}")


def plan_gguf(facts: ExportFacts) -> GGUFPlan:
    """The llama.cpp architecture for ``facts`` (see the module docstring); UpcycleError otherwise."""
    f = facts
    if f.window:
        raise _refuse("sliding-window attention (llama.cpp's llama, ernie4_5-moe and glm4moe attend to everything)")
    if f.rope_type != "default":
        raise _refuse(f"{f.rope_type} rope scaling (exported exactly: the default rotary embedding)")
    if f.attention_bias:
        raise _refuse("attention output biases (ernie4_5-moe and glm4moe graphs add none)")
    lead = min(f.moe_layers)
    if set(f.moe_layers) != set(range(lead, f.num_layers)):
        raise _refuse(f"MoE layers {','.join(map(str, f.moe_layers))} of {f.num_layers}: llama.cpp's architectures "
                      "run MoE in the last layers only (dense ones first); export with --all-moe")
    if f.moe.normalize_topk and not f.qk_norm:
        return GGUFPlan("llama", 0) if f.all_moe and not f.shared_ffn else GGUFPlan("ernie4_5-moe", lead)
    return GGUFPlan("glm4moe", lead)


def glm4moe_shared_count(facts: ExportFacts) -> int:
    """glm4moe's ``expert_shared_count``: its shared expert is that many times the experts' width F."""
    return max(1, -(-facts.shared_ffn // facts.ffn))


def _to_norm_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or biases) from transformers' halves layout to llama.cpp's adjacent pairs, per head."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_pieces(facts: ExportFacts, plan: GGUFPlan, shape_of) -> list[Piece]:
    """Every tensor of the GGUF file, in order, with its source (``shape_of``: a source tensor's shape)."""
    f, E, F, D = facts, facts.moe.num_experts, facts.ffn, facts.hidden
    norm_rope = plan.arch in NORM_ROPE_ARCHS

    def copy(dst: str, src: str, role: str = "weight", take=None) -> Piece:
        return Piece(dst, tuple(shape_of(src)), src, take, role)

    out = [copy("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(f.num_layers):
        b, sa = f"blk.{i}", f"{f.layer_prefix(i)}.self_attn"
        out.append(copy(f"{b}.attn_norm.weight", f"{f.layer_prefix(i)}.input_layernorm.weight", "norm"))
        for w, heads in (("q", f.heads), ("k", f.kv_heads), ("v", None)):
            take = (lambda t, h=heads: _to_norm_rope(t, h)) if norm_rope and heads else None
            out.append(copy(f"{b}.attn_{w}.weight", f"{sa}.{w}_proj.weight", take=take))
            if f.qkv_bias:
                out.append(copy(f"{b}.attn_{w}.bias", f"{sa}.{w}_proj.bias", "bias", take))
        out.append(copy(f"{b}.attn_output.weight", f"{sa}.o_proj.weight"))
        if f.qk_norm:
            out += [copy(f"{b}.attn_q_norm.weight", f"{sa}.q_norm.weight", "norm"),
                    copy(f"{b}.attn_k_norm.weight", f"{sa}.k_norm.weight", "norm")]
        ffn_norm = "post_attention_norm" if plan.arch == "glm4moe" else "ffn_norm"
        out.append(copy(f"{b}.{ffn_norm}.weight", f"{f.layer_prefix(i)}.post_attention_layernorm.weight", "norm"))
        if i not in f.moe_layers:
            mp = f"{f.layer_prefix(i)}.mlp"
            out += [copy(f"{b}.ffn_{p}.weight", f"{mp}.{p}_proj.weight") for p in ("gate", "up", "down")]
            continue
        srcs = f.expert_sources(i)
        out.append(Piece(f"{b}.ffn_gate_inp.weight", (E, D), srcs["router"][0], None, "router"))
        for part, shape in (("gate", (E, F, D)), ("up", (E, F, D)), ("down", (E, D, F))):
            out.append(Piece(f"{b}.ffn_{part}_exps.weight", shape, *srcs[part]))
        if plan.arch == "glm4moe":
            out.append(Piece(f"{b}.exp_probs_b.bias", (E,), None, role="router"))
        out += _shared_pieces(f, plan, b, srcs)
    out.append(copy("output_norm.weight", "model.norm.weight", "norm"))
    if not f.tie:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


def _shared_pieces(f: ExportFacts, plan: GGUFPlan, b: str, srcs: dict) -> list[Piece]:
    """``ffn_{gate,up,down}_shexp`` of one MoE layer: ours as it is (ernie4_5-moe), padded with zero neurons
    to glm4moe's width (an all-zero one where there is none), or nothing (see the module docstring)."""
    D, Fs = f.hidden, f.shared_ffn
    if plan.arch == "glm4moe":
        W = glm4moe_shared_count(f) * f.ffn
    elif Fs and plan.arch == "ernie4_5-moe":
        W = Fs
    else:
        return []
    out = []
    for part, shape in (("gate", (W, D)), ("up", (W, D)), ("down", (D, W))):
        if not Fs:
            out.append(Piece(f"{b}.ffn_{part}_shexp.weight", shape, None))
            continue
        source, view = srcs[f"shared_{part}"]
        pad = (0, W - Fs) if part == "down" else (0, 0, 0, W - Fs)  # zero neurons: down columns, gate/up rows
        take = (lambda t, v=view, p=pad: torch.nn.functional.pad(v(t) if v else t, p)) if W > Fs else view
        out.append(Piece(f"{b}.ffn_{part}_shexp.weight", shape, source, take))
    return out


def _storage(piece: Piece, outtype: str):
    """(GGML type, bytes) of ``piece`` stored for ``outtype``."""
    import gguf

    T = gguf.GGMLQuantizationType
    n = int(np.prod(piece.shape))
    if piece.role != "weight" or len(piece.shape) < 2 or outtype == "f32":
        return T.F32, 4 * n
    kind = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    if kind == T.Q8_0 and piece.shape[-1] % 32:
        kind = T.F16  # Q8_0 blocks are 32 values of a row
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return kind, n // block * size


def _encode(values: torch.Tensor, kind) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    x = values.detach().to(torch.float32).contiguous().numpy()
    if kind == T.F32:
        return x
    if kind == T.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, kind)  # BF16 and Q8_0 as llama.cpp's own Python quantizer writes them


def _hparams(w, facts: ExportFacts, plan: GGUFPlan) -> None:
    import gguf

    f = facts
    w.add_context_length(f.raw["max_position_embeddings"])
    w.add_embedding_length(f.hidden)
    w.add_block_count(f.num_layers)
    w.add_feed_forward_length(f.dense_ffn if plan.arch != "llama" else f.ffn)
    w.add_head_count(f.heads)
    w.add_head_count_kv(f.kv_heads)
    w.add_key_length(f.head_dim)
    w.add_value_length(f.head_dim)
    w.add_rope_dimension_count(f.head_dim)
    w.add_rope_freq_base(f.rope_theta)
    w.add_layer_norm_rms_eps(f.rms_eps)
    w.add_vocab_size(f.vocab)
    w.add_expert_count(f.moe.num_experts)
    w.add_expert_used_count(f.moe.top_k)
    if plan.arch != "llama":
        w.add_expert_feed_forward_length(f.ffn)
        w.add_leading_dense_block_count(plan.lead)
    if plan.arch == "ernie4_5-moe":
        w.add_uint32(f"{plan.arch}.interleave_moe_layer_step", 1)  # gguf 0.16 has no add_ method for it
        if f.shared_ffn:
            w.add_uint32(f"{plan.arch}.expert_shared_feed_forward_length", f.shared_ffn)
    if plan.arch == "glm4moe":
        w.add_expert_shared_count(glm4moe_shared_count(f))
        w.add_expert_weights_norm(f.moe.normalize_topk)
        w.add_expert_weights_scale(1.0)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)


def write_gguf(src, facts: ExportFacts, path: str, *, outtype: str | None, origin: str,
               progress: bool = True) -> tuple[str, int]:
    """Write ``src`` (an upcycled checkpoint, opened) as a GGUF file at ``path``; (architecture, bytes)."""
    import gguf

    from upcycle.surgery.gguf_vocab import tokenizer_fields

    plan = plan_gguf(facts)
    if outtype is None:
        outtype = "f16" if src.default_dtype in (torch.float16, torch.bfloat16) else "f32"
    pieces = gguf_pieces(facts, plan, lambda n: src.tensor_info(n)[0])
    vocab = tokenizer_fields(str(src.path), facts.raw)  # refusals before the file is opened
    storage = [_storage(p, outtype) for p in pieces]
    w = gguf.GGUFWriter(path, plan.arch)
    up = facts.raw["upcycle"]
    w.add_name(f"{up['source']['model']} upcycled ({facts.moe.num_experts} experts)")
    w.add_description(f"upcycle {__version__} export of {origin} (fingerprint {src.fingerprint})")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(file_type)
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(w, facts, plan)
    for key, value, vtype in vocab:
        if vtype == gguf.GGUFValueType.ARRAY:  # element type from the values (gguf 0.16 takes no sub-type)
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for piece, (kind, nbytes) in zip(pieces, storage):
        w.add_tensor_info(piece.name, piece.shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
    total = sum(n for _, n in storage)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        cache: dict[str, torch.Tensor] = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc="exporting", disable=not progress) as bar:
            for piece, (kind, nbytes) in zip(pieces, storage):
                if piece.source is not None and piece.source not in cache:
                    cache.clear()
                    cache[piece.source] = src.get_tensor(piece.source)
                data = _encode(piece.value(cache.get(piece.source)), kind)
                if data.nbytes != nbytes:
                    raise RuntimeError(f"{piece.name}: {data.nbytes} bytes, planned {nbytes}")
                w.write_tensor_data(data)
                bar.update(nbytes)
    finally:
        w.close()
    return plan.arch, total
