"""Adapters: LoRA on Linear layers and on stacked experts, saved in Hugging Face PEFT's format.

    from upcycle.adapters import LoraConfig, apply_lora, save_adapter, load_adapter
    model = upcycle.load("runs/smollm2-moe")
    apply_lora(model, LoraConfig(r=8, alpha=16))       # attention q/k/v/o + every expert
    ...train...
    save_adapter(model, "runs/adapter", base_path="runs/smollm2-moe")
    model = load_adapted("runs/adapter")               # its base (NF4 if trained so) with it on: upcycle.load does this
"""

from upcycle.adapters.config import LoraConfig
from upcycle.adapters.inject import (
    LORA_WRAPPERS,
    apply_lora,
    lora_modules,
    match_modules,
    merge_and_unload,
    merge_lora,
    trainable_summary,
    unload_lora,
    unmerge_lora,
)
from upcycle.adapters.lora import LoraExperts, LoraLinear, lora_scaling
from upcycle.adapters.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from upcycle.adapters.qlora import (
    DEFAULT_TARGETS,
    NF4Linear,
    NF4StackedExperts,
    default_compute_dtype,
    experts_identical,
    quantize_model,
)
from upcycle.adapters.shared import SharedStackedExperts, share_experts, shared_base_report, unshare_experts
from upcycle.adapters.merge import merge_command
from upcycle.adapters.adapted import Adapted, load_adapted, resolve_base
from upcycle.adapters.nf4_record import nf4_record, quantize_as_recorded
from upcycle.adapters.peft_io import (
    adapter_base,
    adapter_state_dict,
    base_fingerprint,
    check_base,
    describe_adapter,
    is_adapter_dir,
    load_adapter,
    load_adapter_weights,
    lora_config_from_peft,
    read_adapter_config,
    save_adapter,
)

# QLoRA: LoRA over a frozen NF4 Linear (it is no nn.Linear, so it registers here).
LORA_WRAPPERS[NF4Linear] = LoraLinear

__all__ = [
    "Adapted",
    "DEFAULT_TARGETS",
    "NF4Linear",
    "NF4StackedExperts",
    "NF4Tensor",
    "default_compute_dtype",
    "dequantize_nf4",
    "experts_identical",
    "quantize_model",
    "quantize_nf4",
    "LORA_WRAPPERS",
    "LoraConfig",
    "LoraExperts",
    "LoraLinear",
    "adapter_base",
    "adapter_state_dict",
    "apply_lora",
    "base_fingerprint",
    "check_base",
    "describe_adapter",
    "is_adapter_dir",
    "load_adapted",
    "load_adapter",
    "load_adapter_weights",
    "lora_config_from_peft",
    "lora_modules",
    "lora_scaling",
    "match_modules",
    "merge_and_unload",
    "merge_command",
    "merge_lora",
    "nf4_record",
    "quantize_as_recorded",
    "read_adapter_config",
    "resolve_base",
    "save_adapter",
    "SharedStackedExperts",
    "share_experts",
    "shared_base_report",
    "unshare_experts",
    "trainable_summary",
    "unload_lora",
    "unmerge_lora",
]
