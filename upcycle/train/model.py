"""The model a recipe trains: loaded, adapted (LoRA / QLoRA), regularised, ready to wrap.

    model, tokenizer, info = build_model(cfg, device)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.models.loader import checkpoint_kind, load_model_and_tokenizer
from upcycle.moe.block import moe_blocks
from upcycle.arch import arch_spec
from upcycle.train.config import TrainConfig


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, where the architecture spec (``upcycle.arch``) finds them."""
    up = getattr(model.config, "upcycle", None)
    path = up["layers"] if isinstance(up, dict) and "layers" in up else arch_spec(model.config, model).layers_prefix
    return model.get_submodule(path)


def _mlp_name(model: nn.Module) -> str:
    up = getattr(model.config, "upcycle", None)
    return up["mlp_name"] if isinstance(up, dict) and "mlp_name" in up else arch_spec(model.config, model).mlp_name


def _residual_dropout_hook(p: float):
    def hook(module, args, output):
        if not module.training or p == 0:
            return output
        if isinstance(output, tuple):  # attention returns (hidden, weights, ...)
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    return hook


def add_residual_dropout(model: nn.Module, p_max: float) -> list[float]:
    """Dropout on each layer's attention and MLP outputs (the residual branches), rising linearly
    from 0 at the first layer to ``p_max`` at the last, as in LIMA. Returns the per-layer rates."""
    layers = decoder_layers(model)
    mlp_name = _mlp_name(model)
    n = len(layers)
    rates = [p_max * i / (n - 1) if n > 1 else p_max for i in range(n)]
    for layer, p in zip(layers, rates):
        attention = [c for c in layer.children() if "attention" in type(c).__name__.lower()]
        branches = attention + [getattr(layer, mlp_name)]
        if len(branches) != 2:
            raise UpcycleError(f"residual_dropout: cannot find the attention and MLP branches of "
                               f"{type(layer).__name__}")
        for branch in branches:
            branch.register_forward_hook(_residual_dropout_hook(p))
    return rates


def build_model(cfg: TrainConfig, device: torch.device, source: str | None = None):
    """(model, tokenizer, info) in training mode on ``device``.

    ``source`` replaces ``cfg.model`` as the weights to load (a full checkpoint being resumed);
    an adapter checkpoint is loaded onto ``cfg.model`` by the caller.
    """
    path = source or cfg.model
    if not os.path.exists(path) and path.startswith(("runs/", "./", "/")):
        raise UpcycleError(f"model not found: {path} (convert one first: upcycle convert --layers 6 --experts 32)")
    if checkpoint_kind(path) == "adapter":  # upcycle.load would attach it, and the recipe would train over it
        raise UpcycleError(f"model {path} is an adapter: train on its base (model=BASE; resume=auto continues its "
                           f"run), or on the model with it folded in (upcycle merge {path} --out DIR, then model=DIR)")
    # Load on the CPU in float32 (master weights); autocast gives bf16 compute on a GPU.
    model, tokenizer = load_model_and_tokenizer(path, experts_backend=cfg.experts_backend)
    model.float()
    info: dict = {"moe_layers": len(moe_blocks(model))}
    for block in moe_blocks(model).values():
        if cfg.aux_loss_weight is not None:
            block.cfg.aux_loss_weight = cfg.aux_loss_weight
        if cfg.z_loss_weight is not None:
            block.cfg.z_loss_weight = cfg.z_loss_weight
    if cfg.lora is not None:
        from upcycle.adapters import apply_lora, quantize_model, trainable_summary

        if cfg.nf4:
            compute = torch.bfloat16 if device.type == "cuda" else torch.float32
            info["nf4"] = quantize_model(model, experts=cfg.lora.experts, compute_dtype=compute)
        apply_lora(model, cfg.lora)  # freezes everything but the adapters (and routers if asked)
        info["trainable"] = trainable_summary(model)
    if cfg.residual_dropout > 0:
        info["residual_dropout"] = add_residual_dropout(model, cfg.residual_dropout)
    if cfg.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UpcycleError(f"{type(model).__name__} does not support activation checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return model.to(device).train(), tokenizer, info
