"""Stock transformers MoE targets: their configs, and which source tensor fills each of their tensors.

    fmt = resolve_format(facts, "auto")          # qwen2_moe | qwen3_moe | mixtral
    config = stock_config(facts, fmt)            # a transformers config; refusals in one line
    pieces = stock_pieces(facts, fmt)            # names as transformers' save_pretrained writes them

Names are the per-expert ones that transformers' own ``save_pretrained`` writes and published
Qwen-MoE / Mixtral checkpoints have (``mlp.experts.3.gate_proj.weight``,
``block_sparse_moe.experts.3.w1.weight``), not transformers v5's fused runtime names: the ones
engines' loaders map (SGLang 0.5.23 ``Qwen2MoeForCausalLM.load_weights`` through
``FusedMoE.make_expert_params_mapping``; vLLM's loader run on them, benchmarks/vllm_load_check.py).

Nothing of size 0 is written. Qwen2-MoE always has a shared expert; without one in the upcycle
its size is 0, so transformers builds zero-element ``shared_expert.*`` weights that a checkpoint
cannot fill, and vLLM builds none at all (``Qwen2MoeSparseMoeBlock``: ``shared_expert = None``
when ``shared_expert_intermediate_size`` is 0) and fails on such names. ``shared_expert_gate``
[1, D] exists in both and is written as zeros.

An upcycle's shared expert (weight 1, always on) goes to Qwen2-MoE's ``shared_expert`` (width
``shared_expert_intermediate_size`` = F_s), which Qwen2-MoE scales by sigmoid(``shared_expert_gate``
x) per token: with that gate at zero the scale is sigmoid(0) = 1/2 exactly, so its ``down_proj``
is written doubled. Doubling is exact in binary floating point (the exponent moves, the
significand does not) unless it overflows, and it commutes with every rounding of the matmul
above the subnormal range: x (2W)^T / 2 = x W^T bit for bit, in float32, bfloat16 and float16
alike. An fp16 export whose doubled weights would overflow is refused (``export._write_stock``).
Mixtral and Qwen3-MoE have no shared expert: refused, naming qwen2_moe.

Expert widths are written rounded up to a multiple of 8 with zero neurons (``EXPERT_ALIGN``: a
zero gate/up row and down column add exactly 0), so that transformers' default experts
implementation can run them; a fine-grained segment (F/G, less the shared neurons) need not be.
"""

from __future__ import annotations

import warnings

import torch

from upcycle.errors import UpcycleError
from upcycle.surgery.export_plan import ExportFacts, Piece

HF_FORMATS = ("qwen2_moe", "qwen3_moe", "mixtral")


def resolve_format(facts: ExportFacts, fmt: str) -> str:
    """``auto``: qwen3_moe for a Qwen3 base, Mixtral when every layer is MoE and Mixtral holds the
    attention exactly, else qwen2_moe."""
    if fmt != "auto":
        return fmt
    if facts.family == "qwen3":
        return "qwen3_moe"
    if facts.all_moe and not facts.qkv_bias and facts.moe.normalize_topk and not facts.shared_ffn:
        return "mixtral"
    return "qwen2_moe"


def _refuse(fmt: str, why: str, could: str | None = None) -> UpcycleError:
    alt = f"; {could} could carry it" if could else ""
    return UpcycleError(f"cannot export to {fmt}: {why}{alt}")


def stock_config(facts: ExportFacts, fmt: str):
    """The transformers config of ``fmt`` for ``facts``; UpcycleError for what ``fmt`` cannot carry."""
    f, n = facts, facts.num_layers
    if f.shared_ffn and fmt in ("mixtral", "qwen3_moe"):
        name = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE"}[fmt]
        if f.qk_norm:
            raise _refuse(fmt, f"a shared expert ({name} has none, and qwen2_moe, which has one, has no QK-norm)",
                          "--format gguf")
        raise _refuse(fmt, f"a shared expert ({name} has none)", "qwen2_moe")
    if fmt == "mixtral":
        if not f.all_moe:
            could = "qwen3_moe" if f.family == "qwen3" else "qwen2_moe"
            raise _refuse(fmt, f"only layers {','.join(map(str, f.moe_layers))} of {n} are MoE (Mixtral has MoE in "
                          "every layer)", f"{could} (or mixtral with --all-moe)" if f.moe.normalize_topk else could)
        if not f.moe.normalize_topk:
            raise _refuse(fmt, "top-K weights that are not renormalised (Mixtral always renormalises)",
                          "qwen3_moe" if f.family == "qwen3" else "qwen2_moe")
        if f.qkv_bias:
            raise _refuse(fmt, "q/k/v biases (Mixtral attention has none)", "qwen2_moe")
        if f.qk_norm:
            raise _refuse(fmt, "QK-norm (Mixtral attention has none)", "qwen3_moe")
        if f.attention_bias:
            raise _refuse(fmt, "attention biases (Mixtral attention has none)")
    elif fmt == "qwen2_moe":
        if f.qk_norm:
            raise _refuse(fmt, "QK-norm (Qwen2-MoE attention has none)",
                          "--format gguf" if f.shared_ffn else "qwen3_moe")
        if f.attention_bias:
            raise _refuse(fmt, "attention output biases (Qwen2-MoE has q/k/v biases only)")
        if f.head_dim * f.heads != f.hidden:
            raise _refuse(fmt, f"a head size of {f.head_dim} (Qwen2-MoE uses hidden / heads)",
                          "mixtral" if f.all_moe else None)
        if f.window:
            raise _refuse(fmt, "sliding-window attention", "mixtral" if f.all_moe else None)
    elif fmt == "qwen3_moe":
        if not f.qk_norm:
            could = "mixtral" if f.all_moe and not f.qkv_bias and f.moe.normalize_topk else "qwen2_moe"
            raise _refuse(fmt, f"a {f.family} model (Qwen3-MoE attention always applies QK-norm)", could)
        if f.window:
            raise _refuse(fmt, "sliding-window attention")
    else:
        raise UpcycleError(f"--format must be one of auto, {', '.join(HF_FORMATS)}, gguf; got {fmt!r}")
    raw = f.raw
    common = dict(
        vocab_size=f.vocab, hidden_size=f.hidden, num_hidden_layers=n, num_attention_heads=f.heads,
        num_key_value_heads=f.kv_heads, hidden_act=f.activation, max_position_embeddings=raw["max_position_embeddings"],
        rms_norm_eps=f.rms_eps, tie_word_embeddings=f.tie, rope_parameters=raw.get("rope_parameters"),
        num_experts_per_tok=f.moe.top_k, bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"), initializer_range=raw.get("initializer_range", 0.02),
        attention_dropout=0.0, router_aux_loss_coef=f.moe.aux_loss_weight,
    )
    if fmt == "mixtral":
        from transformers import MixtralConfig

        config = MixtralConfig(**common, intermediate_size=stock_expert_width(f), num_local_experts=f.moe.num_experts,
                               head_dim=f.head_dim, sliding_window=f.window)
        config.architectures = ["MixtralForCausalLM"]
        return config
    moe_common = dict(moe_intermediate_size=stock_expert_width(f), norm_topk_prob=f.moe.normalize_topk,
                      decoder_sparse_step=1,
                      mlp_only_layers=list(f.dense_layers), intermediate_size=f.dense_ffn, use_sliding_window=False)
    if fmt == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        config = Qwen2MoeConfig(**common, **moe_common, shared_expert_intermediate_size=f.shared_ffn,
                                num_experts=f.moe.num_experts)
        config.architectures = ["Qwen2MoeForCausalLM"]
        return config
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**common, **moe_common, num_experts=f.moe.num_experts, head_dim=f.head_dim,
                            attention_bias=f.attention_bias)
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config


EXPERT_ALIGN = 8
"""Expert widths in the stock formats are multiples of this (zero neurons added): transformers' default experts
implementation (``grouped_mm``, transformers/integrations/moe.py, 5.25) calls ``torch.nn.functional.grouped_mm``,
which raises "strides should be multiple of 16 bytes" unless rows are 16-byte aligned (4 float32 or 8 bfloat16
values), on CPU and CUDA alike. Fine-grained segments (F/G, shared neurons taken out, padding) need not be."""


def stock_expert_width(facts: ExportFacts) -> int:
    """The experts' width as written: F rounded up to ``EXPERT_ALIGN``."""
    return -(-facts.ffn // EXPERT_ALIGN) * EXPERT_ALIGN


def stock_pieces(facts: ExportFacts, fmt: str, shape_of) -> list[Piece]:
    """Every tensor of the ``fmt`` checkpoint, in layer order, under its ``save_pretrained`` name.
    ``shape_of(name)``: a source tensor's shape (tensors copied as they are keep it)."""
    f = facts

    def copy(name: str, role: str = "weight") -> Piece:
        return Piece(name, tuple(shape_of(name)), name, role=role)

    out = [copy("model.embed_tokens.weight")]
    moe_name = "block_sparse_moe" if fmt == "mixtral" else "mlp"
    w = {"gate": "w1", "up": "w3", "down": "w2"} if fmt == "mixtral" else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for i in range(f.num_layers):
        lp = f.layer_prefix(i)
        for name in f.attention_names(i):
            role = "norm" if name.endswith("norm.weight") else "bias" if name.endswith(".bias") else "weight"
            out.append(copy(name, role))
        if fmt == "qwen2_moe" and not f.qkv_bias:
            # Qwen2-MoE attention has q/k/v biases: zeros where the source has none.
            dims = {"q": f.heads * f.head_dim, "k": f.kv_heads * f.head_dim, "v": f.kv_heads * f.head_dim}
            out += [Piece(f"{lp}.self_attn.{p}_proj.bias", (d,), None, role="bias") for p, d in dims.items()]
        if i not in f.moe_layers:
            out += [copy(f"{lp}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")]
            continue
        E, F, D, Fp = f.moe.num_experts, f.ffn, f.hidden, stock_expert_width(f)
        srcs = f.expert_sources(i)
        router, _ = srcs["router"]
        out.append(Piece(f"{lp}.{moe_name}.gate.weight", (E, D), router, role="router"))
        for e in range(E):
            for part, shape in (("gate", (Fp, D)), ("up", (Fp, D)), ("down", (D, Fp))):
                source, view = srcs[part]
                pad = (0, Fp - F) if part == "down" else (0, 0, 0, Fp - F)  # zero neurons: columns / rows
                take = (lambda t, v=view, e=e, p=pad: torch.nn.functional.pad((v(t) if v else t)[e], p))
                out.append(Piece(f"{lp}.{moe_name}.experts.{e}.{w[part]}.weight", shape, source, take))
        if fmt == "qwen2_moe":
            out += _shared_pieces(f, lp, srcs)
    out.append(copy("model.norm.weight", "norm"))
    if not f.tie:
        out.append(copy("lm_head.weight"))
    return out


def _shared_pieces(f: ExportFacts, lp: str, srcs: dict) -> list[Piece]:
    """Qwen2-MoE's ``shared_expert`` (when the upcycle has one: its down_proj doubled) and its gate of zeros:
    sigmoid(0) = 1/2 exactly (module docstring)."""
    out = []
    if f.shared_ffn:
        Fs, D = f.shared_ffn, f.hidden
        for part, shape in (("gate", (Fs, D)), ("up", (Fs, D)), ("down", (D, Fs))):
            source, view = srcs[f"shared_{part}"]
            take = view if part != "down" else (lambda t, v=view: (v(t) if v else t) * 2)
            out.append(Piece(f"{lp}.mlp.shared_expert.{part}_proj.weight", shape, source, take))
    out.append(Piece(f"{lp}.mlp.shared_expert_gate.weight", (1, f.hidden), None, role="router"))
    return out


def runtime_shapes(config) -> dict[str, tuple[int, ...]]:
    """transformers' own module tree for ``config`` (meta device): name -> shape, zero-size entries
    left out (no checkpoint can fill them; the loader leaves them empty as they were built)."""
    from upcycle.arch import skeleton

    with warnings.catch_warnings():  # torch notes that a size-0 shared expert has nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        state = skeleton(config).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in state.items() if v.numel()}


def check_against_transformers(config, pieces: list[Piece]) -> None:
    """The planned checkpoint fills exactly transformers' module tree: per-expert names stacked back
    into the fused runtime tensors (as its loader does) give every non-empty tensor, nothing else."""
    import re

    want = runtime_shapes(config)
    fused: dict[str, list] = {}
    for p in pieces:
        m = re.fullmatch(r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)"
                         r"\.weight", p.name)
        if m:
            key = f"{m.group(1)}.mlp.experts." + ("down_proj" if m.group(3) in ("down_proj", "w2") else "gate_up_proj")
            fused.setdefault(key, []).append(p.shape)
        else:
            fused[p.name.replace(".block_sparse_moe.", ".mlp.")] = [p.shape]
    got = {}
    for k, shapes in fused.items():
        if len(shapes) == 1 and not k.endswith("experts.down_proj") and not k.endswith("gate_up_proj"):
            got[k] = shapes[0]
        elif k.endswith("gate_up_proj"):
            got[k] = (len(shapes) // 2, 2 * shapes[0][0], shapes[0][1])
        else:
            got[k] = (len(shapes), *shapes[0])
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise UpcycleError(f"internal: the {config.model_type} plan does not match transformers' model "
                           f"(missing {missing[:2]}, unexpected {extra[:2]})")
    bad = [k for k in want if want[k] != got[k]]
    if bad:
        raise UpcycleError(f"internal: {bad[0]} planned {got[bad[0]]}, transformers builds {want[bad[0]]}")
