"""upcycle: dense LLM checkpoints -> sparse Mixture-of-Experts, fast experts, cheap fine-tuning.

    import upcycle
    upcycle.convert(upcycle.ConvertConfig(out="runs/moe", layers=6, moe=upcycle.MoEConfig(num_experts=32)))
    model = upcycle.load("runs/moe")

Importing the package registers the ``upcycle_<arch>`` model types with transformers, so
``AutoModelForCausalLM.from_pretrained`` loads upcycled checkpoints too.
"""

from upcycle import modeling as _modeling  # noqa: F401  (registers the Auto classes)
from upcycle.adapters.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from upcycle.config import ConvertConfig, MoEConfig
from upcycle.errors import UpcycleError
from upcycle.models.loader import load
from upcycle.surgery.convert import convert
from upcycle.version import __version__

__all__ = ["ConvertConfig", "MoEConfig", "NF4Tensor", "UpcycleError", "convert", "dequantize_nf4", "load",
           "quantize_nf4", "__version__"]
