"""The always-on shared expert of an MoE block (DeepSeekMoE, Qwen1.5-MoE): a plain dense MLP.

    shared = SharedExpert(hidden_size=576, ffn_size=384, gated=True, activation="silu")
    y_TD = shared(x_TD)          # down(act(gate x) * up x), every token, weight 1

Upcycling puts a subset of the dense MLP's neurons here (``upcycle.surgery.segments``). Its
projections are ``nn.Linear`` modules named as Qwen2-MoE names its ``shared_expert`` (``gate_proj``,
``up_proj``, ``down_proj``; non-gated: ``up_proj``, ``down_proj``), so the checkpoint keys
``...mlp.shared_expert.gate_proj.weight`` [F_s, D] map one to one onto a stock export, and LoRA,
NF4 and PEFT treat them as the Linear layers they are.

Shape legend: T tokens, D hidden size, F_s the shared expert's width.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.activations import ACT2FN

from upcycle.errors import UpcycleError


class SharedExpert(nn.Module):
    """``down(act(gate x) * up x)`` (gated) or ``down(act(up x))``, with optional biases."""

    def __init__(self, hidden_size: int, ffn_size: int, *, gated: bool, activation: str, bias: bool = False,
                 dtype=None, device=None):
        super().__init__()
        if activation not in ACT2FN:
            raise UpcycleError(f"unknown activation {activation!r}; transformers knows: {', '.join(sorted(ACT2FN))}")
        kw = dict(bias=bias, dtype=dtype, device=device)
        self.hidden_size, self.ffn_size, self.gated, self.activation = hidden_size, ffn_size, gated, activation
        if gated:
            self.gate_proj = nn.Linear(hidden_size, ffn_size, **kw)
        self.up_proj = nn.Linear(hidden_size, ffn_size, **kw)
        self.down_proj = nn.Linear(ffn_size, hidden_size, **kw)
        self.act_fn = ACT2FN[activation]

    def forward(self, x_TD: Tensor) -> Tensor:
        """x [..., D] -> [..., D]."""
        h = self.act_fn(self.gate_proj(x_TD)) * self.up_proj(x_TD) if self.gated else self.act_fn(self.up_proj(x_TD))
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"gated={self.gated}, activation={self.activation!r}"
