"""The one tolerance table for numerical comparisons (DESIGN.md section 6).

Use ``torch.testing.assert_close(a, b, **TOLERANCES[dtype])``; a test that needs looser
bounds says why in a comment next to the relaxation.
"""

import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    # fp16 keeps 3 more mantissa bits than bf16; its rounding error is ~8x smaller.
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}

# A whole 30-layer real model in fp32 (SmolLM2-135M, logits up to ~|30|): the MoE computes
# each MLP on a gathered subset of tokens and sums K weighted copies, so its GEMMs round
# differently from the dense ones; through 30 layers that is ~5e-5 absolute on the logits,
# the same order as running the dense model itself with a different batch layout.
REAL_MODEL_FP32 = dict(atol=2e-4, rtol=1e-5)

# Layouts against one process (tests/test_expert_parallel.py), fp32 on the CPU: the one-process sums in
# another order (gradients summed over ranks instead of over micro-batches; an expert's rows from every
# rank in one GEMM; the clipping norm in float64). Observed on the tiny models: 3e-7 of a tensor's largest
# gradient at the first step, 3e-8 relative on the losses.
LAYOUT_GRAD_FP32 = 1e-6
"""max |g - g_ref| / max |g_ref| per parameter, at the first step compared."""
LAYOUT_LOSS_FP32 = 1e-6
"""Relative difference of every logged step's loss, aux loss and gradient norm."""
# Weights after a few AdamW steps: where a gradient component is within eps of zero, AdamW's g / (|g| + eps)
# turns a summation-order difference d into lr * d / eps. The tests train with eps 1e-6 (not 1e-8), which keeps
# that near 1e-7: observed 3.3e-7 after 3 steps at lr 3e-3 with expert parallel 2 (DDP: 6.6e-8). Gradients
# of later steps carry the weights' difference too: 4e-6 relative at step 3 (LAYOUT_LATER_GRAD_FP32).
LAYOUT_WEIGHTS_FP32 = 1e-6
"""max |w - w_ref| (absolute) of the last checkpoint's weights."""
LAYOUT_LATER_GRAD_FP32 = 2e-5
"""As LAYOUT_GRAD_FP32, for a step after the first (the weights already differ by LAYOUT_WEIGHTS_FP32)."""
