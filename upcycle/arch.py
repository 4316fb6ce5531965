"""Where a model's MLPs live and what they compute, read off the model itself.

    spec = arch_spec(config)            # from a meta-device instance: no memory, no weights
    spec.layers_prefix, spec.mlp_name   # "model.layers", "mlp"
    spec.form                           # MLPForm: gated / fused / plain, names, Conv1D, bias

Nothing is guessed from the family's name: the decoder layers are the model's ``ModuleList``
of ``num_hidden_layers`` blocks (the language model's, in a multimodal checkpoint), the MLP
is the child of a decoder layer made of projections and an activation, and its form follows
from the projections' shapes:

* three projections, two [F, D] in and one [D, F] out: gated ``down(act(gate x) * up x)``;
* two, the first [2F, D]: gated with one fused ``gate_up`` weight;
* two, the first [F, D]: non-gated ``down(act(up x))``;
* ``Conv1D`` projections (GPT-2 style) are the same forms stored transposed.

Which in-projection is the gate, which half of a fused weight is, and the activation are
not always visible in the module: ``form`` lists the candidates, and conversion keeps the
one that reproduces the MLP on the real weights of the first upcycled layer
(``surgery.verify``). ``FAMILIES`` lists the families tested end to end (registered with
transformers' Auto classes at import, listed in the README); any other decoder-only family
whose MLP has one of these forms converts too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.activations import ACT2CLS
from transformers.pytorch_utils import Conv1D

from upcycle.errors import UpcycleError

FAMILIES: dict[str, str] = {
    "llama": "gated SiLU (SmolLM, SmolLM2 are Llama)",
    "mistral": "gated SiLU",
    "ministral": "gated SiLU",
    "qwen2": "gated SiLU",
    "qwen3": "gated SiLU",
    "gemma": "gated GELU-tanh",
    "gemma2": "gated GELU-tanh, soft-capping, sliding windows",
    "gemma3_text": "gated GELU-tanh",
    "gemma3": "gated GELU-tanh (the language model of the vision-language checkpoint)",
    "olmo2": "gated SiLU, norms after attention and MLP",
    "olmo3": "gated SiLU",
    "granite": "gated SiLU, residual and logit multipliers",
    "smollm3": "gated SiLU",
    "cohere": "gated SiLU, parallel attention and MLP",
    "stablelm": "gated SiLU",
    "phi3": "fused gate_up SiLU",
    "glm4": "fused gate_up SiLU",
    "gpt_neox": "non-gated GELU with biases",
    "phi": "non-gated GELU-tanh with biases, parallel attention and MLP",
    "nemotron": "non-gated squared ReLU",
    "starcoder2": "non-gated GELU-tanh with biases",
    "gpt2": "non-gated GELU-tanh with biases, Conv1D (transposed) weights",
}
"""model_type -> what its MLP is: the families tested end to end."""

SUPPORTED_FORMS = ("gated down(act(gate x) * up x) with separate or fused gate/up, non-gated down(act(up x)), "
                   "with or without biases, Linear or GPT-2 Conv1D")

# Defaults tried when neither the module nor the config names its activation.
_COMMON_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "relu2", "quick_gelu")
_CONFIG_ACT_ATTRS = ("hidden_act", "hidden_activation", "activation_function", "activation", "act_fn")
_TORCH_ACTS = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_IGNORED = (nn.Dropout, nn.Identity)
_DOWN_NAMES = ("down", "out", "w2", "fc2", "c_proj", "4h_to_h")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "block_sparse_moe")


@dataclass(frozen=True)
class MLPForm:
    """What one dense MLP computes and where its tensors are (child names inside the MLP)."""

    kind: str
    """``gated`` (separate gate and up), ``fused`` (one gate_up weight) or ``plain`` (non-gated)."""
    up: str
    """The in-projection (``gated``: the up one; ``fused``: the gate_up one)."""
    down: str
    gate: str | None = None
    """``gated`` only."""
    transposed: bool = False
    """Conv1D: weights stored [in, out]."""
    bias: bool = False
    gate_first: bool = True
    """``fused``: the gate is the first half of the rows (else the second)."""
    activations: tuple[str, ...] = ()
    """Candidate ``ACT2FN`` names, most likely first; one after ``surgery.verify``."""

    @property
    def gated(self) -> bool:
        return self.kind != "plain"

    @property
    def activation(self) -> str:
        return self.activations[0]

    def candidates(self):
        """Every concrete reading of this form: gate/up or half order, then activation."""
        orders = [self]
        if self.kind == "gated":
            orders.append(replace(self, gate=self.up, up=self.gate))
        elif self.kind == "fused":
            orders.append(replace(self, gate_first=not self.gate_first))
        for order in orders:
            for act in self.activations:
                yield replace(order, activations=(act,))


@dataclass(frozen=True)
class ArchSpec:
    family: str
    """The transformers ``model_type`` (the upcycled one is ``upcycle_<family>``)."""
    layers_prefix: str
    """Module path (and state-dict prefix) of the decoder layers, e.g. ``model.layers``."""
    mlp_name: str
    """Attribute of a decoder layer that holds the MLP."""
    form: MLPForm
    num_layers: int

    def mlp_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.mlp_name}"


def refuse(family: str, reason: str) -> UpcycleError:
    return UpcycleError(f"cannot upcycle architecture {family!r}: {reason}; supported MLPs: {SUPPORTED_FORMS} "
                        f"(tested families: {', '.join(FAMILIES)})")


def skeleton(config) -> nn.Module:
    """The model on the meta device: module tree, names and shapes, no memory, no init."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:  # not a causal LM transformers knows
        raise refuse(config.model_type, f"transformers has no causal LM for it ({str(e).splitlines()[0][:120]})")


def arch_spec(config, model: nn.Module | None = None) -> ArchSpec:
    """Where the MLPs of ``config``'s model are and what form they have; a one-line refusal otherwise.

    ``model``: its meta skeleton, if the caller has one.
    """
    family = config.model_type.removeprefix("upcycle_")
    model = model if model is not None else skeleton(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) and (n is None or len(m) == n)]
    if not stacks:
        raise refuse(family, f"no stack of {n} decoder layers found")
    # A multimodal model has several stacks (vision, audio): the language model's is the one.
    stacks.sort(key=lambda s: ("language_model" not in s[0], s[0].count("."), s[0]))
    reasons = []
    for path, layers in stacks:
        for child_name, child in _mlp_candidates(layers[0]):
            form = mlp_form(child, config)
            if isinstance(form, MLPForm):
                return ArchSpec(family, path, child_name, form, len(layers))
            reasons.append(f"{path}.0.{child_name}: {form}")
    raise refuse(family, "; ".join(reasons[:2]) or "its decoder layers have no MLP module")


def _mlp_candidates(layer: nn.Module):
    """The decoder layer's MLP by its usual names, else any child with projections (never attention)."""
    kids = dict(layer.named_children())
    named = [k for k in _MLP_NAMES if k in kids]
    others = [k for k, c in kids.items() if k not in named and "attention" not in type(c).__name__.lower()
              and any(isinstance(g, (nn.Linear, Conv1D)) for g in c.children())]
    for name in named or others:
        yield name, kids[name]


def mlp_form(mlp: nn.Module, config) -> MLPForm | str:
    """The form of MLP module ``mlp``, or why it has none of the supported forms."""
    kind = type(mlp).__name__
    names = {n for n, _ in mlp.named_children()} | {n for n, _ in mlp.named_parameters()}
    if names & {"experts", "router"} or any(n.startswith(("experts.", "router.")) for n in names):
        return f"its MLP ({kind}) is a mixture of experts already"
    own = [n for n, _ in mlp.named_parameters(recurse=False)]
    if own:
        return f"its MLP ({kind}) has parameters of its own ({', '.join(own)})"
    projections, acts = {}, []
    for name, child in mlp.named_children():
        if isinstance(child, (nn.Linear, Conv1D)):
            projections[name] = child
        elif isinstance(child, _IGNORED):
            continue
        elif _activation_name(child) is not None:
            acts.append(child)
        else:
            return f"its MLP ({kind}) holds a {type(child).__name__} ({name}), not only projections and an activation"
    if any(list(a.parameters()) for a in acts):
        return f"its MLP ({kind}) has an activation with learned parameters"
    shapes = {n: _in_out(p) for n, p in projections.items()}
    biases = {p.bias is not None for p in projections.values()}
    if len(biases) != 1:
        return f"its MLP ({kind}) has biases on some projections only"
    bias = biases.pop()
    transposed = any(isinstance(p, Conv1D) for p in projections.values())
    activations = _activation_candidates(acts, config)
    if len(projections) == 3:
        # down: the projection whose output feeds both others' input, and the reverse.
        downs = [n for n in shapes if all(shapes[m] == shapes[n][::-1] for m in shapes if m != n)]
        if len(downs) > 1:  # square (F == D): the name decides
            downs = [n for n in downs if any(w in n.lower() for w in _DOWN_NAMES)]
        if len(downs) != 1:
            return f"its MLP ({kind}) has three projections that do not chain as gate, up -> down"
        down = downs[0]
        # The name usually tells the gate (gate_proj, w1 of w1/w3); verification settles it either way.
        gate, up = sorted((n for n in shapes if n != down), key=lambda n: ("gate" not in n.lower() and n != "w1", n))
        return MLPForm("gated", up, down, gate, transposed, bias, True, activations)
    if len(projections) == 2:
        first, second = projections  # definition order: the in-projection usually comes first
        for a, b in ((first, second), (second, first)):
            (a_in, a_out), (b_in, b_out) = shapes[a], shapes[b]
            if a_in == b_out and a_out == b_in:
                return MLPForm("plain", a, b, None, transposed, bias, True, activations)
            if a_in == b_out and a_out == 2 * b_in:
                return MLPForm("fused", a, b, None, transposed, bias, True, activations)
        return f"its MLP ({kind}) has two projections that do not chain as up -> down"
    return f"its MLP ({kind}) has {len(projections)} projections"


def _in_out(p: nn.Module) -> tuple[int, int]:
    if isinstance(p, Conv1D):
        return p.weight.shape[0], p.weight.shape[1]
    return p.in_features, p.out_features


@functools.lru_cache(maxsize=None)
def _act_classes() -> dict:
    out = {}
    for name, entry in ACT2CLS.items():
        cls, kwargs = entry if isinstance(entry, tuple) else (entry, {})
        out.setdefault((cls, tuple(sorted(kwargs.items()))), name)
    return out


def _activation_name(module: nn.Module) -> str | None:
    """The ``ACT2FN`` name of an activation module (None: not a known activation)."""
    if type(module) in _TORCH_ACTS:
        return _TORCH_ACTS[type(module)]
    if isinstance(module, nn.GELU):
        return "gelu_pytorch_tanh" if module.approximate == "tanh" else "gelu"
    for (cls, kwargs), name in _act_classes().items():
        if type(module) is cls and not kwargs:
            return name
    if "gelu" in type(module).__name__.lower():  # a family's own GELU (Bloom's): verification picks the variant
        return "gelu_new"
    return None


def _activation_candidates(acts: list[nn.Module], config) -> tuple[str, ...]:
    from transformers.activations import ACT2FN

    found = [_activation_name(a) for a in acts]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    named = [getattr(text, a) for a in _CONFIG_ACT_ATTRS if isinstance(getattr(text, a, None), str)]
    out: list[str] = []
    for name in [*found, *named, *_COMMON_ACTIVATIONS]:
        if name and name in ACT2FN and name not in out:
            out.append(name)
    return tuple(out)


def families_markdown() -> str:
    """The README's table of tested families (the README keeps a copy; a test checks they agree)."""
    rows = ["| family (`model_type`) | its MLP |", "|---|---|"]
    rows += [f"| `{family}` | {note} |" for family, note in FAMILIES.items()]
    return "\n".join(rows) + "\n"
