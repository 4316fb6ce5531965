"""vLLM's own weight loader on ``upcycle export`` outputs, on a CPU: every parameter filled, with our values.

    python -m venv /tmp/vllm-venv --system-site-packages
    /tmp/vllm-venv/bin/pip install --no-deps vllm==0.34.0   # plus the pure-Python imports it asks for
    /tmp/vllm-venv/bin/python benchmarks/vllm_load_check.py runs/exported-qwen2 runs/exported-mixtral ...

No GPU is needed to build a vLLM model and load its weights: the model classes are plain torch
modules once vLLM's CPU platform is selected. For each export this builds the model vLLM would
serve (its config, its ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM`` / ``MixtralForCausalLM``),
loads the checkpoint with vLLM's ``DefaultModelLoader`` (which raises unless every parameter was
filled: ``track_weights_loading``), then compares every vLLM parameter with the checkpoint tensors
it should hold: ``qkv_proj`` = [q; k; v], a dense ``gate_up_proj`` = [gate; up], expert e of
``w13_weight`` = [gate_e; up_e] and of ``w2_weight`` = down_e, anything else by name. The forward
pass is not run (vLLM's CPU kernels are not in its CUDA wheel). Prints one table row per export.
"""

from __future__ import annotations

import glob
import os
import re
import sys


def _select_cpu_platform() -> None:
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()  # the CUDA wheel finds no GPU and no platform otherwise
    import vllm.triton_utils

    # 0.34 refuses x86 CPUs without triton-cpu, which only its kernels (never run here) need.
    vllm.triton_utils.HAS_TRITON = True


def _checkpoint(path: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _expected(name: str, ckpt: dict, num_experts: int):
    """The value vLLM's parameter ``name`` must hold, rebuilt from the checkpoint tensors."""
    import torch

    base = name.rsplit(".", 1)[0]
    if ".qkv_proj." in name:
        kind = name.rsplit(".", 1)[1]
        return torch.cat([ckpt[base.replace("qkv_proj", p) + "." + kind] for p in ("q_proj", "k_proj", "v_proj")])
    m = re.fullmatch(r"(.*)\.experts\.routed_experts\.(w13|w2)_weight", name)
    if m:
        prefix = m.group(1)
        mixtral = f"{prefix}.experts.0.w1.weight" in ckpt
        names = ({"w13": ("w1", "w3"), "w2": ("w2",)} if mixtral else
                 {"w13": ("gate_proj", "up_proj"), "w2": ("down_proj",)})[m.group(2)]
        return torch.stack([torch.cat([ckpt[f"{prefix}.experts.{e}.{n}.weight"] for n in names])
                            for e in range(num_experts)])
    if name.endswith(".gate_up_proj.weight"):
        return torch.cat([ckpt[name.replace("gate_up_proj", p)] for p in ("gate_proj", "up_proj")])
    if name == "lm_head.weight" and name not in ckpt:
        return ckpt["model.embed_tokens.weight"]
    return ckpt[name]


def check(path: str) -> dict:
    import torch
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import get_model_architecture

    mc = ModelConfig(model=path, dtype="float32", enforce_eager=True)
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig("cpu"),
                    load_config=LoadConfig(load_format="safetensors"))
    with set_current_vllm_config(vc):
        if not torch.distributed.is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method="tcp://127.0.0.1:29517")
        if not model_parallel_is_initialized():
            initialize_model_parallel(1, 1)
        cls, arch = get_model_architecture(mc)
        model = cls(vllm_config=vc, prefix="")
        DefaultModelLoader(vc.load_config).load_weights(model, mc)  # raises unless every parameter was filled
    ckpt = _checkpoint(path)
    hf = mc.hf_config
    experts = getattr(hf, "num_experts", None) or hf.num_local_experts
    wrong = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), _expected(n, ckpt, experts).float())]
    return {"export": os.path.basename(os.path.normpath(path)), "architecture": arch,
            "vllm_parameters": sum(1 for _ in model.named_parameters()), "checkpoint_tensors": len(ckpt),
            "all_filled": True, "values_equal": not wrong, "first_wrong": wrong[0] if wrong else ""}


def main(paths: list[str]) -> int:
    import vllm

    _select_cpu_platform()
    rows = [check(p) for p in paths]
    print(f"vLLM {vllm.__version__}, DefaultModelLoader on CPU")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0 if all(r["values_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
