"""What an upcycled checkpoint is, read for export: the facts every target format decides on.

    facts = ExportFacts.of(raw_config)          # refuses, in one line, what no export carries
    facts.moe_layers, facts.dense_layers         # after ``with_all_moe()`` every layer is MoE
    srcs = facts.expert_sources(3)               # which source tensor (and view) feeds each expert slot

Shape legend: E experts (E·G at granularity G: every segment is an expert), F expert FFN width
(a segment's), F_s the shared expert's width, D hidden size, H attention heads.

Both exports (stock transformers checkpoints in ``export.py``, GGUF in ``gguf_export.py``)
walk the same facts, so a refusal means the same thing in both. A ``Piece`` is one output
tensor and the recipe that fills it from at most one source tensor (a view of it, or zeros),
so writers stream one source tensor at a time.

``--all-moe`` (``with_all_moe``): every dense layer's MLP becomes E identical experts under a
router of zeros. All router logits tie, so whichever K experts an engine picks, renormalised
top-K gives each 1/K and the sum is the dense MLP. The copies cost (E - 1) x that MLP's
weights, and a token runs K copies where it ran one MLP. Without renormalisation the layer
would give K/E x the MLP: refused. With a shared expert (granularity 1) the dense MLP is dealt
out as convert deals an upcycled one: its first F_s neurons become the layer's shared expert
(weight 1), the other F - F_s its E identical routed copies. At granularity G > 1 it is refused:
under a router of zeros all E·G segments tie, and an engine may pick any K·G of them, not K whole
copies (segment 0 of two copies and no segment 3, say).

Fine-grained upcycles (``moe.granularity`` G > 1) need nothing else: their experts are the
segments, stored with the 1/G share already given back in down_proj, and a copy's G segments
have identical router rows, so any engine that routes renormalised top-(K·G) in float32 picks
whole copies, as upcycle does (in bf16, logits of two copies can round to the same value: see
the README's export section). Padding neurons are zero rows and columns and are exported as
they are: they add exactly 0 in every engine.
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
    """F: each routed expert's width (the dense MLP's at granularity 1, a segment's, padding included,
    at G > 1)."""
    dense_ffn: int
    """Width of the dense MLPs that stay dense."""
    shared_ffn: int
    """F_s: the always-on shared expert's width (0: none)."""
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
            shared_ffn=int(mlp.get("shared_ffn_size", 0)),
            heads=raw["num_attention_heads"], kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=head_dim, vocab=raw["vocab_size"], qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
            attention_bias=bool(raw.get("attention_bias")), tie=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_type=rope.get("rope_type", "default"), rms_eps=raw["rms_norm_eps"], window=window,
            activation=mlp["activation"], raw=raw)

    def with_all_moe(self) -> ExportFacts:
        """Every dense layer's MLP as E identical experts (see the module docstring)."""
        E, K, G = self.moe.num_experts, self.moe.top_k, self.moe.granularity
        if not self.moe.normalize_topk:
            raise UpcycleError(
                "cannot export --all-moe without renormalised top-K: E identical copies under tied router "
                f"logits would give {K}/{E} of each dense MLP, not all of it")
        if G > 1:
            raise UpcycleError(
                f"cannot export --all-moe at granularity {G}: under a router of zeros all {E} segments of a dense "
                f"layer tie, and an engine may pick any {K} of them rather than {K // G} whole copies")
        if self.ffn + self.shared_ffn != self.dense_ffn:
            raise UpcycleError(f"cannot export --all-moe: the dense MLPs are {self.dense_ffn} wide, the experts "
                               f"{self.ffn}"
                               + (f" plus a shared expert of {self.shared_ffn}" if self.shared_ffn else "")
                               + " (the dense MLP must split into exactly those)")
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

    def expert_sources(self, i: int) -> dict[str, tuple[str | None, Callable | None]]:
        """(source tensor, view) per part of MoE layer ``i``: ``gate`` [E, F, D], ``up`` [E, F, D], ``down``
        [E, D, F], ``router`` [E, D] and, with a shared expert, ``shared_gate`` / ``shared_up`` [F_s, D],
        ``shared_down`` [D, F_s]. A copied dense layer gives its MLP repeated E times (its first F_s neurons
        as the shared expert, the rest as the copies) and no router tensor (zeros)."""
        E, F, Fs, mp = self.moe.num_experts, self.ffn, self.shared_ffn, f"{self.layer_prefix(i)}.mlp"
        if i in self.upcycled_layers:
            out = {"gate": (f"{mp}.experts.gate_up_proj", lambda t: t[:, :F]),
                   "up": (f"{mp}.experts.gate_up_proj", lambda t: t[:, F:]),
                   "down": (f"{mp}.experts.down_proj", None), "router": (f"{mp}.router.weight", None)}
            if Fs:
                out.update({f"shared_{p}": (f"{mp}.shared_expert.{p}_proj.weight", None)
                            for p in ("gate", "up", "down")})
            return out

        def rep(t):  # a view: no copy until written
            return t.unsqueeze(0).expand(E, *t.shape)

        out = {"gate": (f"{mp}.gate_proj.weight", lambda t: rep(t[Fs:])),
               "up": (f"{mp}.up_proj.weight", lambda t: rep(t[Fs:])),
               "down": (f"{mp}.down_proj.weight", lambda t: rep(t[:, Fs:])), "router": (None, None)}
        if Fs:
            out.update({"shared_gate": (f"{mp}.gate_proj.weight", lambda t: t[:Fs]),
                        "shared_up": (f"{mp}.up_proj.weight", lambda t: t[:Fs]),
                        "shared_down": (f"{mp}.down_proj.weight", lambda t: t[:, :Fs])})
        return out

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
                if self.shared_ffn:
                    Fs = self.shared_ffn
                    want.update({f"{mp}.shared_expert.gate_proj.weight": (Fs, D),
                                 f"{mp}.shared_expert.up_proj.weight": (Fs, D),
                                 f"{mp}.shared_expert.down_proj.weight": (D, Fs)})
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
