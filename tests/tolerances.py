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

# llama.cpp running a GGUF export (tests/test_llama_cpp.py, KV cache in f32), per --outtype: the largest
# logit difference as a fraction of the largest |logit| (tiny models have logits ~4, SmolLM2 ~35).
# The reference is upcycle.load of the source with its matrices rounded as the file stores them (norms,
# biases, routers stay f32). What remains is llama.cpp's arithmetic, u being the unit roundoff of
# what its CPU dot products round activations to:
GGUF_VS_UPCYCLE = {
    # f32: only the summation order (SIMD, tiled); SmolLM2, 30 layers: 7e-5 of 35 = 2e-6.
    "f32": 5e-6,
    # f16 weights: activations rounded to f16 too (u = 2^-11 = 4.9e-4); measured 5e-4 (tiny) of the scale.
    "f16": 2e-3,
    # bf16: activations rounded to bf16 (u = 2^-8 = 3.9e-3); measured 6.3e-3 (tiny).
    "bf16": 1.6e-2,
    # q8_0: activations quantised to 8 bits per block of 32 (1/127 of the block's max); measured 1.4e-2 (tiny).
    "q8_0": 3e-2,
}
# A fresh upcycle's GGUF against the dense model's GGUF written by llama.cpp's own converter, both run by
# llama.cpp at the same outtype. The stored tensors are bit-identical (tests check it); the MoE layers run
# llama.cpp's mul_mat_id kernel where the dense ones run mul_mat. For f32 and q8_0 (activations quantised
# to q8_0 either way) those compute the same (SmolLM2: 7e-7 and 0 of the scale); for f16 / bf16 the dense
# mul_mat takes another CPU path (SmolLM2: 9.4e-4 and 5.8e-3 of the scale), the same size as the outtype's
# own activation rounding above.
GGUF_VS_DENSE_GGUF = {"f32": 5e-6, "f16": 2e-3, "bf16": 1.6e-2, "q8_0": 5e-6}

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
