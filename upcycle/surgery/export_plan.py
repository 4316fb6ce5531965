"""What an upcycled checkpoint is, read for export: the facts every target format decides on.

    facts = ExportFacts.of(raw_config)          # refuses, in one line, what no export carries
    facts.moe_layers, facts.dense_layers         # after ``with_all_moe()`` every layer is MoE
    pieces = facts.layer_pieces(src, 3)          # [Piece]: which source tensor feeds which slot

Shape legend: E experts, F expert FFN width, D hidden size, H attention heads.

Both exports (stock transformers checkpoints in ``export.py``, GGUF in ``gguf_export.py``)
walk the same facts, so a refusal means the same thing in both. A ``Piece`` is one output
tensor and the recipe that fills it from at most one source tensor (a view of it, or zeros),
so writers stream one source tensor at a time.

``--all-moe`` (``with_all_moe``): every dense layer's MLP becomes E identical experts under a
router of zeros. All router logits tie, so whichever K experts an engine picks, renormalised
top-K gives each 1/K and the sum is the dense MLP. The copies cost (E - 1) x that MLP's
weights, and a token runs K copies where it ran one MLP. Without renormalisation the layer
would give K/E x the MLP: refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from upcycle.config import MoEConfig, from_dict
from upcycle.errors import UpcycleError

LLAMA_FORM = ("llama", "mistral", "qwen2", "qwen3")
"""Source families whose dense parts the targets hold exactly: pre-norm RMSNorm, rotary
attention (Qwen2: q/k/v biases; Qwen3: per-head q/k RMSNorm), gated SiLU MLP."""


@dataclass(frozen=True)
class Piece:
    """One output tensor: ``take(source tensor)`` (a view) or zeros when ``source`` is None."""

    name: str
    shape: tuple[int, ...]
    source: str | None
    take: Callable[[torch.Tensor], torch.Tensor] | None = None
    role: str = "weight"
    """``weight`` (a matrix), ``norm``, ``bias``, ``router``: writers choose storage types by it."""

    def value(self, tensor: torch.Tensor | None) -> torch.Tensor:
        if self.source is None:
            return torch.zeros(self.shape)
        out = tensor if self.take is None else self.take(tensor)
        if tuple(out.shape) != self.shape:  # a wrong recipe must never reach the file
            raise RuntimeError(f"{self.name}: planned {self.shape}, got {tuple(out.shape)}")
        return out


@dataclass(frozen=True)
class ExportFacts:
    """An upcycled ``config.json`` as the exports read it (see the module docstring)."""

    family: str
    """The dense source's ``model_type``: one of ``LLAMA_FORM``."""
    num_layers: int
    moe_layers: tuple[int, ...]
    """Layers that are MoE in the output (all of them after ``with_all_moe``)."""
    upcycled_layers: tuple[int, ...]
    """Layers that are MoE in the source."""
    moe: MoEConfig
    hidden: int
    ffn: int
    """F: each expert's width (the dense MLP's)."""
    dense_ffn: int
    """Width of the dense MLPs that stay dense."""
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool
    qk_norm: bool
    attention_bias: bool
    """Biases on q, k, v and o (transformers' ``attention_bias``)."""
    tie: bool
    rope_theta: float
    rope_type: str
    rms_eps: float
    window: int | None
    """Sliding-window size when the source uses one."""
    activation: str
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def all_moe(self) -> bool:
        return self.moe_layers == tuple(range(self.num_layers))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    @property
    def copied_layers(self) -> tuple[int, ...]:
        """Dense in the source, MoE of E identical copies in the output (``--all-moe``)."""
        return tuple(i for i in self.moe_layers if i not in self.upcycled_layers)

    @classmethod
    def of(cls, raw: dict) -> ExportFacts:
        """Read ``raw`` (an upcycled config.json); UpcycleError, one line, for what no export carries."""
        up = raw["upcycle"]
        family, mlp = up["base_model_type"], up["mlp"]
        moe = from_dict(MoEConfig, up["moe"], "config.upcycle.moe")
        if moe.routing != "topk":
            raise UpcycleError(f"cannot export {moe.routing} routing: stock MoE formats and engines route top-K")
        if family not in LLAMA_FORM:
            raise UpcycleError(f"cannot export the dense parts of a {family} model: exports carry "
                               f"{', '.join(LLAMA_FORM)} exactly")
        if not mlp["gated"] or mlp["bias"]:
            raise UpcycleError("cannot export " + ("a non-gated MLP" if not mlp["gated"] else "MLP biases")
                               + ": stock MoE experts are gated and bias-free")
        if raw.get("mlp_bias"):
            raise UpcycleError("cannot export MLP biases: stock MoE experts are bias-free")
        if mlp["activation"] != "silu":
            raise UpcycleError(f"cannot export a {mlp['activation']} MLP: stock MoE experts are SiLU-gated")
        rope = raw.get("rope_parameters") or {}
        head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
        n = raw["num_hidden_layers"]
        window = raw.get("sliding_window") if raw.get("use_sliding_window", family == "mistral") else None
        return cls(
            family=family, num_layers=n, moe_layers=tuple(sorted(up["layer_ids"])),
            upcycled_layers=tuple(sorted(up["layer_ids"])), moe=moe, hidden=raw["hidden_size"],
            ffn=mlp["ffn_size"], dense_ffn=raw.get("intermediate_size", mlp["ffn_size"]),
            heads=raw["num_attention_heads"], kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=head_dim, vocab=raw["vocab_size"], qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
            attention_bias=bool(raw.get("attention_bias")), tie=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_type=rope.get("rope_type", "default"), rms_eps=raw["rms_norm_eps"], window=window,
            activation=mlp["activation"], raw=raw)

    def with_all_moe(self) -> ExportFacts:
        """Every dense layer's MLP as E identical experts (see the module docstring)."""
        if not self.moe.normalize_topk:
            raise UpcycleError(
                "cannot export --all-moe without renormalised top-K: E identical copies under tied router "
                f"logits would give {self.moe.top_k}/{self.moe.num_experts} of each dense MLP, not all of it")
        if self.ffn != self.dense_ffn:
            raise UpcycleError(f"cannot export --all-moe: the dense MLPs are {self.dense_ffn} wide, the experts "
                               f"{self.ffn} (one expert width per model)")
        return replace(self, moe_layers=tuple(range(self.num_layers)))

    # ---------------------------------------------------------------- tensors

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def attention_names(self, i: int) -> list[str]:
        """The source's attention and norm tensors of layer ``i``, in a stable order."""
        p = f"{self.layer_prefix(i)}.self_attn"
        names = [f"{p}.{w}_proj.weight" for w in "qkvo"]
        if self.qkv_bias or self.attention_bias:
            names += [f"{p}.{w}_proj.bias" for w in "qkv"]
        if self.attention_bias:
            names.append(f"{p}.o_proj.bias")
        if self.qk_norm:
            names += [f"{p}.q_norm.weight", f"{p}.k_norm.weight"]
        return names + [f"{self.layer_prefix(i)}.input_layernorm.weight",
                        f"{self.layer_prefix(i)}.post_attention_layernorm.weight"]

    def expert_sources(self, i: int) -> dict[str, tuple[str, Callable | None]]:
        """``gate`` [E, F, D], ``up`` [E, F, D], ``down`` [E, D, F], ``router`` [E, D] of MoE layer ``i``:
        (source tensor, view) or, for a copied dense layer, its MLP repeated E times (router: None)."""
        E, F, mp = self.moe.num_experts, self.ffn, f"{self.layer_prefix(i)}.mlp"
        if i in self.upcycled_layers:
            return {"gate": (f"{mp}.experts.gate_up_proj", lambda t: t[:, :F]),
                    "up": (f"{mp}.experts.gate_up_proj", lambda t: t[:, F:]),
                    "down": (f"{mp}.experts.down_proj", None), "router": (f"{mp}.router.weight", None)}
        rep = lambda t: t.unsqueeze(0).expand(E, *t.shape)  # noqa: E731 - a view: no copy until written
        return {"gate": (f"{mp}.gate_proj.weight", rep), "up": (f"{mp}.up_proj.weight", rep),
                "down": (f"{mp}.down_proj.weight", rep), "router": (None, None)}

    def check_tensors(self, src) -> None:
        """Every tensor the facts promise is in ``src`` with its shape, and ``src`` holds nothing else."""
        D, F, E = self.hidden, self.ffn, self.moe.num_experts
        want: dict[str, tuple[int, ...] | None] = {"model.embed_tokens.weight": (self.vocab, D),
                                                   "model.norm.weight": (D,)}
        if not self.tie:
            want["lm_head.weight"] = (self.vocab, D)
        for i in range(self.num_layers):
            want.update({n: None for n in self.attention_names(i)})
            mp = f"{self.layer_prefix(i)}.mlp"
            if i in self.upcycled_layers:
                want.update({f"{mp}.router.weight": (E, D), f"{mp}.experts.gate_up_proj": (E, 2 * F, D),
                             f"{mp}.experts.down_proj": (E, D, F)})
            else:
                FF = self.dense_ffn
                want.update({f"{mp}.gate_proj.weight": (FF, D), f"{mp}.up_proj.weight": (FF, D),
                             f"{mp}.down_proj.weight": (D, FF)})
        have = set(src.tensor_names())
        extra = sorted(have - set(want))
        if extra:
            raise UpcycleError(f"cannot export {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                               + ": no stock MoE format has a place for it")
        for name, shape in want.items():
            if name not in have:
                raise UpcycleError(f"cannot export: the source has no tensor {name}")
            got = tuple(src.tensor_info(name)[0])
            if shape is not None and got != shape:
                raise UpcycleError(f"cannot export: {name} has shape {got}, expected {shape}")
