"""Elementwise activations and their derivatives, inlined into the GEMM epilogues.

Each transformers ``ACT2FN`` name the kernels support maps to one integer code (a
constexpr, so every kernel compiles only the branch it uses). The math runs in float32 on
the accumulator tile; tanh is written through the sigmoid because ``tl`` has no tanh that
also runs under the CPU interpreter. Constants are literals: sqrt(2/pi) = 0.79788...,
1/sqrt(2) = 0.70710..., 1/sqrt(2 pi) = 0.39894....
"""

from __future__ import annotations

import triton
import triton.language as tl

# tl.constexpr: the only kind of global a jitted function may read.
ACT_SILU = tl.constexpr(0)  # x * sigmoid(x)                        (SwiGLU gates: Llama, Mistral, Qwen, SmolLM)
ACT_GELU = tl.constexpr(1)  # 0.5 x (1 + erf(x / sqrt 2))           (transformers "gelu": exact erf)
ACT_GELU_TANH = tl.constexpr(2)  # 0.5 x (1 + tanh(c (x + 0.044715 x^3)))  (GPT-NeoX "gelu_new" and friends)
ACT_QUICK_GELU = tl.constexpr(3)  # x * sigmoid(1.702 x)
ACT_RELU = tl.constexpr(4)
ACT_RELU2 = tl.constexpr(5)  # relu(x)^2                              (Nemotron, Persimmon, Primer's squared ReLU)

ACTIVATIONS = {
    "silu": ACT_SILU.value,
    "swish": ACT_SILU.value,
    "gelu": ACT_GELU.value,
    "gelu_python": ACT_GELU.value,
    "gelu_new": ACT_GELU_TANH.value,
    "gelu_fast": ACT_GELU_TANH.value,
    "gelu_pytorch_tanh": ACT_GELU_TANH.value,
    "gelu_python_tanh": ACT_GELU_TANH.value,
    "quick_gelu": ACT_QUICK_GELU.value,
    "relu": ACT_RELU.value,
    "relu2": ACT_RELU2.value,
}


def activation_code(name: str) -> int:
    """The kernel code of a transformers activation name; ValueError if the kernels lack it."""
    if name not in ACTIVATIONS:
        raise ValueError(f"the triton experts kernels do not implement activation {name!r}; "
                         f"supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """act(z) for a float32 tile."""
    if ACT == ACT_SILU:
        out = z * tl.sigmoid(z)
    elif ACT == ACT_GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == ACT_GELU_TANH:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == ACT_QUICK_GELU:
        out = z * tl.sigmoid(1.702 * z)
    elif ACT == ACT_RELU2:
        r = tl.maximum(z, 0.0)
        out = r * r
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def act_fwd_bwd(z, ACT: tl.constexpr):
    """(act(z), act'(z)) for a float32 tile: backward needs both for a gated unit."""
    if ACT == ACT_SILU:
        s = tl.sigmoid(z)
        out = z * s
        grad = s * (1.0 + z * (1.0 - s))
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        out = z * cdf
        grad = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == ACT_GELU_TANH:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * z * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * z * z)
    elif ACT == ACT_QUICK_GELU:
        s = tl.sigmoid(1.702 * z)
        out = z * s
        grad = s * (1.0 + 1.702 * z * (1.0 - s))
    elif ACT == ACT_RELU2:
        r = tl.maximum(z, 0.0)
        out = r * r
        grad = 2.0 * r
    else:
        out = tl.maximum(z, 0.0)
        grad = tl.where(z > 0, 1.0, 0.0)
    return out, grad
