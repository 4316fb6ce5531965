"""Per-architecture table: where the MLPs live, what their tensors are called, how they compute.

One row per family. Adding an architecture means adding a row here, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import UpcycleError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    """Name used in messages and in the registered model_type (``upcycle_<model_type>``)."""
    layers_prefix: str
    """State-dict prefix of the decoder layers, e.g. ``model.layers``."""
    mlp_name: str
    """Attribute of a decoder layer that holds the MLP."""
    gated: bool
    """SwiGLU-style ``down(act(gate x) * up x)`` if True, else ``down(act(up x))``."""
    gate: str | None
    """Name of the gate projection inside the MLP (gated only)."""
    up: str
    down: str
    act_attr: str
    """Config attribute naming the activation (a transformers ACT2FN key)."""
    num_layers_attr: str = "num_hidden_layers"
    bias_attr: str | None = None
    """Config attribute telling whether the MLP Linears have biases; None: ``bias_default``."""
    bias_default: bool = False

    def mlp_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.mlp_name}"

    def has_bias(self, config) -> bool:
        return bool(getattr(config, self.bias_attr, self.bias_default)) if self.bias_attr else self.bias_default

    def activation(self, config) -> str:
        return getattr(config, self.act_attr)

    def num_layers(self, config) -> int:
        return getattr(config, self.num_layers_attr)


_LLAMA_LIKE = dict(
    layers_prefix="model.layers", mlp_name="mlp", gated=True,
    gate="gate_proj", up="up_proj", down="down_proj", act_attr="hidden_act",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(family="llama", bias_attr="mlp_bias", **_LLAMA_LIKE),
    "mistral": ArchSpec(family="mistral", **_LLAMA_LIKE),
    "qwen2": ArchSpec(family="qwen2", **_LLAMA_LIKE),
    "qwen3": ArchSpec(family="qwen3", **_LLAMA_LIKE),
    "gpt_neox": ArchSpec(
        family="gpt_neox", layers_prefix="gpt_neox.layers", mlp_name="mlp", gated=False,
        gate=None, up="dense_h_to_4h", down="dense_4h_to_h", act_attr="hidden_act", bias_default=True,
    ),
}


def arch_for(model_type: str) -> ArchSpec:
    """The table row for a transformers ``model_type``; a clear error for anything else."""
    base = model_type.removeprefix("upcycle_")
    if base not in ARCHITECTURES:
        raise UpcycleError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[base]
