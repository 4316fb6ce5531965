"""Tiny random models of every family in ``upcycle.arch.FAMILIES``, built from transformers configs.

Norm weights are drawn around 1 and biases around 0 (not left at their 1 / 0 init), so no
norm or bias is the identity by accident; each family keeps what makes it itself
(soft-capping, sliding windows, residual multipliers, parallel blocks, Conv1D, a vision tower).
"""

from __future__ import annotations

import torch

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64, pad_token_id=0)

EXTRA = {
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(head_dim=16, sliding_window=8),
    "ministral": dict(head_dim=16, sliding_window=8),
    "granite": dict(residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=3.0, attention_multiplier=0.2),
    "cohere": dict(logit_scale=0.5),
    "stablelm": dict(use_qkv_bias=True),
    "phi": dict(partial_rotary_factor=0.5),
    "nemotron": dict(head_dim=16, partial_rotary_factor=0.5),
    "starcoder2": dict(use_bias=True),
}


def tiny_config(family: str, **overrides):
    """``overrides``: config fields on top of the tiny defaults (``vocab_size``, ``rope_theta``...)."""
    from transformers import AutoConfig

    if family == "gpt2":
        return AutoConfig.for_model("gpt2", **{**dict(n_embd=64, n_layer=4, n_head=4, n_inner=96, vocab_size=128,
                                                      n_positions=64), **overrides})
    if family == "gemma3":  # the vision-language checkpoint: upcycle its language model
        from transformers import Gemma3Config

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                      patch_size=8)
        return Gemma3Config(text_config=dict(COMMON, head_dim=16, sliding_window=8, **overrides), vision_config=vision,
                            mm_tokens_per_image=4, image_token_index=120, boi_token_index=121, eoi_token_index=122)
    return AutoConfig.for_model(family, **{**COMMON, **EXTRA.get(family, {}), **overrides})


def make_family(family: str, path=None, seed: int = 0, **overrides):
    """A tiny random dense model of ``family`` in eval mode (saved to ``path`` if given); ``overrides`` as in
    ``tiny_config``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            if "norm" in leaf or leaf.startswith("ln"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if path is not None:
        model.save_pretrained(path)
    return model
