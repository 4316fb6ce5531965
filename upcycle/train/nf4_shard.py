"""NF4 experts cut to a range of experts, with exactly the dequantised values of those experts.

    experts, names = shard_nf4(block.experts, lo, hi)    # QLoRA under expert_parallel

NF4 quantises the flattened [E, R, C] stack in blocks of ``blocksize``; when an expert's R*C
elements are a whole number of blocks (every real shape: R*C = 2F*D or D*F), experts lo:hi are
the packed bytes and absmax blocks of their elements. Double quantisation keeps one fp32 scale per
256 absmax and one offset for the whole stack: a range that starts on a 256-block boundary keeps
them as they are (4.127 bits a parameter); one that does not stores its absmax decoded to fp32
(what the double-quantised values decode to, bit for bit: 4.5 bits a parameter). A shared base
(one stored expert seen E times) only changes its count.

Shape legend: E experts, R x C one expert's matrix, B absmax blocks.
"""

from __future__ import annotations

import math

from upcycle.adapters.nf4 import DQ_BLOCKSIZE, NF4Tensor
from upcycle.adapters.qlora import NF4StackedExperts
from upcycle.errors import UpcycleError


def slice_nf4(q: NF4Tensor, lo: int, hi: int, keep_double: bool) -> NF4Tensor:
    """Experts lo:hi of an [E, R, C] NF4Tensor (``keep_double``: keep double quantisation, aligned ranges only)."""
    E = q.shape[0]
    per = q.numel // E
    if per % q.blocksize or per % 2:
        raise UpcycleError(f"expert_parallel cannot cut NF4 experts of {per} elements: not a whole number of "
                           f"{q.blocksize}-element blocks")
    b0, b1 = lo * per // q.blocksize, hi * per // q.blocksize
    packed = q.packed[lo * per // 2:hi * per // 2]
    shape = (hi - lo, *q.shape[1:])
    if keep_double:
        return NF4Tensor(packed, q.absmax[b0:b1], shape, q.dtype, q.blocksize,
                         q.absmax2[b0 // DQ_BLOCKSIZE:math.ceil(b1 / DQ_BLOCKSIZE)], q.offset)
    return NF4Tensor(packed, q.absmax_fp32()[b0:b1], shape, q.dtype, q.blocksize)


def _double_aligned(q: NF4Tensor, lo: int) -> bool:
    per = q.numel // q.shape[0]
    return q.double_quant and (lo * per // q.blocksize) % DQ_BLOCKSIZE == 0


def shard_nf4(experts: NF4StackedExperts, lo: int, hi: int) -> tuple[NF4StackedExperts, list[str]]:
    """``experts`` holding experts lo:hi only (a new module unless a shared base), and the names of its
    per-expert tensors (the biases; the NF4 buffers are not cut along a leading expert dim)."""
    bias_names = [f"{experts.up_name}_bias", "down_proj_bias"] if experts.has_bias else []
    if experts.shared_base:
        experts.num_experts = hi - lo
        for name in bias_names:
            p = experts._parameters[name]
            experts._parameters[name] = type(p)(p.detach()[lo:hi].clone(), requires_grad=False)
        return experts, bias_names
    names = (experts.up_name, "down_proj")
    stored = {name: experts.nf4(name) for name in names}
    keep_double = all(_double_aligned(q, lo) for q in stored.values())
    cut = {name: slice_nf4(q, lo, hi, keep_double) for name, q in stored.items()}
    first = stored["down_proj"]
    out = NF4StackedExperts(hi - lo, experts.hidden_size, experts.ffn_size, gated=experts.gated,
                            activation=experts.activation, bias=experts.has_bias, backend=experts.backend,
                            blocksize=first.blocksize, double_quant=keep_double, shared_base=False,
                            compute_dtype=experts.compute_dtype, dtype=first.dtype, device=first.device)
    sd = {}
    for name, q in cut.items():
        sd.update(q.state_dict(prefix=f"{name}_"))
    for name in bias_names:
        sd[name] = experts.state_dict()[name][lo:hi]
    out.load_state_dict(sd)
    return out, bias_names
