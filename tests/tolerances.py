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
