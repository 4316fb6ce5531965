"""transformers integration: ``Upcycle<Base>ForCausalLM`` classes, registered with the Auto API.

An upcycled checkpoint's ``config.json`` is the base config with ``model_type`` set to
``upcycle_<base>`` and an ``upcycle`` section. The registered model class is the base
transformers class whose MLPs at ``upcycle.layer_ids`` are replaced by ``MoEBlock`` at
construction, so ``from_pretrained``, ``save_pretrained`` and ``generate`` are transformers'
own and the stacked expert tensors load by name. The model's forward hands its attention
mask to the MoE blocks, so padded positions get no expert.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from upcycle.config import MoEConfig, from_dict
from upcycle.errors import UpcycleError
from upcycle.moe.block import MoEBlock, use_attention_mask
from upcycle.arch import FAMILIES, arch_spec

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
    have the model's forward hand them its attention mask (pads are routed nowhere)."""
    up = config.upcycle
    if "layers" in up:
        layers_prefix, mlp_name = up["layers"], up["mlp_name"]
    else:  # written before the section recorded them: read them off the model
        spec = arch_spec(config, model)
        layers_prefix, mlp_name = spec.layers_prefix, spec.mlp_name
    mlp = up["mlp"]
    moe_cfg = moe_config_of(config)
    layers = model.get_submodule(layers_prefix)
    for i in up["layer_ids"]:
        old = getattr(layers[i], mlp_name)
        weight = next(old.parameters())
        block = MoEBlock(
            moe_cfg, mlp["hidden_size"], mlp["ffn_size"], gated=mlp["gated"], activation=mlp["activation"],
            bias=mlp["bias"], shared_ffn_size=mlp.get("shared_ffn_size", 0),  # absent: written before shared experts
            backend=backend, dtype=weight.dtype, device=weight.device,
        )
        setattr(layers[i], mlp_name, block)
    use_attention_mask(model)


def register(base_model_type: str) -> tuple[type, type]:
    """(config class, model class) of ``upcycle_<base_model_type>``, registered with the Auto classes.

    The tested families (``FAMILIES``) are registered when ``upcycle`` is imported; any other
    family on first use (``upcycle.convert``, ``upcycle.load``).
    """
    base = base_model_type.removeprefix("upcycle_")
    if base not in _CONFIG_CLASSES:
        if base not in CONFIG_MAPPING:
            raise UpcycleError(f"unknown architecture {base!r}: this transformers has no such model_type")
        _register(base)
    return _CONFIG_CLASSES[base], _MODEL_CLASSES[base]


def _register(base_model_type: str) -> None:
    base_config = CONFIG_MAPPING[base_model_type]
    if base_config not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UpcycleError(f"architecture {base_model_type!r} has no causal LM class in transformers")
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


for _base in FAMILIES:
    if _base in CONFIG_MAPPING:  # a family newer than the installed transformers is simply not there
        _register(_base)
