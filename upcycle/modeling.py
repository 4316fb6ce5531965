"""transformers integration: ``Upcycle<Base>ForCausalLM`` classes, registered with the Auto API.

An upcycled checkpoint's ``config.json`` is the base config with ``model_type`` set to
``upcycle_<base>`` and an ``upcycle`` section. The registered model class is the base
transformers class whose MLPs at ``upcycle.layer_ids`` are replaced by ``MoEBlock`` at
construction, so ``from_pretrained``, ``save_pretrained`` and ``generate`` are transformers'
own and the stacked expert tensors load by name. The decoder's forward hands its attention
mask to the MoE blocks, so padded positions get no expert.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from upcycle.config import MoEConfig, from_dict
from upcycle.errors import UpcycleError
from upcycle.moe.block import MoEBlock, use_attention_mask
from upcycle.surgery.arch import ARCHITECTURES, arch_for

_CONFIG_CLASSES: dict[str, type] = {}
_MODEL_CLASSES: dict[str, type] = {}


def is_upcycled(config) -> bool:
    return isinstance(getattr(config, "upcycle", None), dict)


def moe_config_of(config) -> MoEConfig:
    """The routing configuration stored in an upcycled config's ``upcycle`` section."""
    if not is_upcycled(config):
        raise UpcycleError("not an upcycled checkpoint: config.json has no 'upcycle' section")
    return from_dict(MoEConfig, config.upcycle["moe"], "config.upcycle.moe")


def install_moe_blocks(model, config, backend: str = "auto") -> None:
    """Replace the MLP of every layer in ``config.upcycle['layer_ids']`` with an ``MoEBlock``, and
    have the decoder's forward hand them its attention mask (pads are routed nowhere)."""
    spec = arch_for(config.upcycle["base_model_type"])
    mlp = config.upcycle["mlp"]
    moe_cfg = moe_config_of(config)
    layers = model.get_submodule(spec.layers_prefix)
    for i in config.upcycle["layer_ids"]:
        old = getattr(layers[i], spec.mlp_name)
        weight = next(old.parameters())
        block = MoEBlock(
            moe_cfg, mlp["hidden_size"], mlp["ffn_size"], gated=mlp["gated"], activation=mlp["activation"],
            bias=mlp["bias"], backend=backend, dtype=weight.dtype, device=weight.device,
        )
        setattr(layers[i], spec.mlp_name, block)
    use_attention_mask(model.get_submodule(spec.layers_prefix.rpartition(".")[0]))


def upcycled_config_class(base_model_type: str) -> type:
    arch_for(base_model_type)  # unsupported architecture: clear error
    return _CONFIG_CLASSES[base_model_type]


def upcycled_model_class(base_model_type: str) -> type:
    arch_for(base_model_type)
    return _MODEL_CLASSES[base_model_type]


def _register(base_model_type: str) -> None:
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    model_type = f"upcycle_{base_model_type}"
    config_cls = type(
        f"Upcycle{base_config.__name__}", (base_config,), {"model_type": model_type, "__module__": __name__}
    )

    def __init__(self, config):
        base_model.__init__(self, config)
        install_moe_blocks(self, config)

    model_cls = type(
        f"Upcycle{base_model.__name__}",
        (base_model,),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__},
    )
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _CONFIG_CLASSES[base_model_type] = config_cls
    _MODEL_CLASSES[base_model_type] = model_cls
    globals()[config_cls.__name__] = config_cls
    globals()[model_cls.__name__] = model_cls


for _base in ARCHITECTURES:
    _register(_base)
