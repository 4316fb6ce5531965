"""upcycle: dense LLM checkpoints -> sparse Mixture-of-Experts, fast experts, cheap fine-tuning.

    import upcycle
    upcycle.convert(upcycle.ConvertConfig(out="runs/moe", layers=6, moe=upcycle.MoEConfig(num_experts=32)))
    model = upcycle.load("runs/moe")

Importing the package registers the ``upcycle_<arch>`` model types with transformers, so
``AutoModelForCausalLM.from_pretrained`` loads upcycled checkpoints too.
"""

__version__ = "0.1.0"

from upcycle.config import ConvertConfig, MoEConfig  # noqa: E402
from upcycle.errors import UpcycleError  # noqa: E402
from upcycle import modeling as _modeling  # noqa: E402,F401  (registers the Auto classes)
from upcycle.checkpoint import load  # noqa: E402
from upcycle.adapters.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4  # noqa: E402
from upcycle.surgery.convert import convert  # noqa: E402

__all__ = ["ConvertConfig", "MoEConfig", "NF4Tensor", "UpcycleError", "convert", "dequantize_nf4", "load",
           "quantize_nf4", "__version__"]
