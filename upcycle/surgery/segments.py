"""Which dense neurons go where, and the expert weights that makes: copies, segments, a shared expert.

    widths = plan_widths(F, G, shared_fraction=0.25)            # F_s, F_e, padding: the same for every layer
    maker = ExpertMaker(cfg, layer, widths, shared_idx, w_in_MD, w_down_DF, b_in_M, b_down_D, gated=True)
    maker.expert(j, "up"), maker.expert(j, "down"), maker.shared("down")    # what convert streams out

A dense MLP ``y = W_d act(W_in x + b_in) + b_d`` is a sum over its F neurons, so its neurons can be
dealt out without changing that sum:

* **shared** (``F_s`` neurons, chosen by ``select``): one always-on expert, weight 1, unscaled. It
  carries the dense down bias ``b_d``: always on, it adds ``b_d`` exactly once whatever the routing.
* **routed** (the other ``F_r``): E copies. Copy e takes them in its own order (as they are, or a
  seeded permutation with ``permute_copies``), cut into G contiguous segments of ``F_e = ceil(F_r / G)``
  neurons (sizes differing by at most one real neuron, each padded with zero neurons to ``F_e``:
  a zero up row and a zero down column add exactly 0, whatever the activation). Expert ``e*G + g`` is
  segment g of copy e.

Why the down projection is scaled by G (and nothing else): the router rows of a copy's G segments
are identical (``router_rows``), so their logits tie exactly and top-(K*G) picks K whole copies;
renormalised over the K*G chosen, each segment gets ``w_c / G`` of its copy's weight ``w_c``. Storing
``G * W_d[:, segment]`` gives the segment ``w_c * W_d[:, segment] h``: the copy's share, as at G = 1.
Scaling the down projection is linear for every MLP form (gated or not, fused or not, Conv1D: all
are stored as ``w_in`` [M, D] / ``w_down`` [D, F] by then); scaling ``gate`` or a non-gated ``up``
would scale inside the activation, which is not linear. A power-of-two G is exact in any float
format; another G rounds once in the stored dtype. The routed down bias is 0 with a shared expert
(which holds ``b_d``); without one every segment holds ``b_d`` unscaled, and a copy's G segments
add ``G * (w_c / G) * b_d = w_c * b_d``, ``b_d`` over the chosen copies (weights summing to 1).

Softmax-then-top-K (``weight_scaling``, He et al. 2024): the combine weights are raw probabilities,
which under a uniform router are 1/(E*G) per segment, K*G segments chosen: the routed down projection
and bias are multiplied by E/K on top of G (in the down projection again, never inside the activation;
Megatron-LM's ``upcycling_utils`` puts the cube root of the whole scale on gate, up and down alike,
which is not a scale of the output for a gated MLP). It is the dense model only where the router is
uniform, so a fresh upcycle is close to it, not equal.

Expert noise and Drop-Upcycling act on a copy's routed neurons at the dense scale, before its
down projection is scaled: a perturbation means at G > 1 what it means at G = 1, and the shared
neurons (every token's path) and the padding are never perturbed. With G = 1 and no shared expert
the experts are bit for bit what earlier versions wrote (same generators, same order).

Shape legend: D hidden size, F dense FFN size, F_s shared width, F_r routed neurons (F - F_s), F_e
expert (segment) width, G segments per copy, E copies, M first-projection rows (2 x width gated).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from upcycle.errors import UpcycleError

ALIGN = 8
"""Neurons per segment that ``shared_fraction`` rounds towards: bf16 grouped_mm needs widths that are
multiples of 8 (16-byte rows), fp32 of 4."""


def generator(seed: int, layer: int, expert: int, what: int) -> torch.Generator:
    """A generator seeded per (seed, layer, expert, tensor): results do not depend on write order."""
    key = hashlib.sha256(f"{seed}/{layer}/{expert}/{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


# ``what`` codes of ``generator``: one stream per purpose (0-4 are the ones earlier versions used).
_DROP_COLS, _DROP_UP, _DROP_DOWN, _NOISE_UP, _NOISE_DOWN, _PERMUTE, _SHARED_RANDOM = range(7)


@dataclass(frozen=True)
class Widths:
    """How one MLP of F neurons is dealt out (the same for every upcycled layer)."""

    dense: int
    """F: the dense MLP's neurons."""
    granularity: int
    """G: segments per copy."""
    shared: int
    """F_s: the shared expert's neurons (0: none)."""
    expert: int
    """F_e: neurons per routed expert (a segment), padding included."""

    @property
    def routed(self) -> int:
        """F_r = F - F_s: the real neurons of one copy."""
        return self.dense - self.shared

    @property
    def padding(self) -> int:
        """Zero neurons per copy: G * F_e - F_r."""
        return self.granularity * self.expert - self.routed


def plan_widths(F: int, G: int, shared_fraction: float | None = None, shared_neurons: int | None = None) -> Widths:
    """The widths for an MLP of F neurons cut into G segments per copy, with an optional shared expert.

    ``shared_neurons`` N is taken exactly. ``shared_fraction`` f: the routed width is (1 - f) F rounded to
    a multiple of 8 G neurons, so every segment is a multiple of 8 (grouped_mm's bf16 alignment) and
    needs no padding, the shared expert taking the rest, if that moves the shared expert's size by at
    most 5% of F and leaves both parts neurons; otherwise (small MLPs, extreme f) round(f F) neurons
    are shared and the segments padded as needed.
    """
    if G < 1:
        raise UpcycleError(f"--granularity must be at least 1, got {G}")
    if shared_fraction is not None and shared_neurons is not None:
        raise UpcycleError("give --shared-fraction or --shared-neurons, not both")
    shared = 0
    if shared_neurons is not None:
        if not 1 <= shared_neurons <= F - G:
            raise UpcycleError(f"--shared-neurons must be between 1 and {F - G} (the MLP has {F} neurons, "
                               f"and each of the {G} segments needs at least one), got {shared_neurons}")
        shared = shared_neurons
    elif shared_fraction is not None:
        if not (math.isfinite(shared_fraction) and 0 < shared_fraction < 1):
            raise UpcycleError(f"--shared-fraction must be between 0 and 1 (exclusive), got {shared_fraction}")
        unit = ALIGN * G
        routed = round((1 - shared_fraction) * F / unit) * unit
        shared = F - routed
        if routed < unit or shared < 1 or abs(shared - shared_fraction * F) > 0.05 * F:
            shared = min(max(1, round(shared_fraction * F)), F - G)
        if shared < 1:
            raise UpcycleError(f"--shared-fraction {shared_fraction}: an MLP of {F} neurons cut into {G} segments "
                               "has no neuron to share")
    if F - shared < G:
        raise UpcycleError(f"--granularity {G} is more segments than the MLP's {F - shared} routed neurons")
    return Widths(dense=F, granularity=G, shared=shared, expert=-(-(F - shared) // G))


def router_rows(num_copies: int, G: int, hidden: int, std: float, gen: torch.Generator) -> Tensor:
    """float32 [E*G, D]: one N(0, std) row per copy, repeated for its G segments (virtual groups: a
    copy's segments tie exactly). With G = 1 the same draws as earlier versions."""
    return (torch.randn(num_copies, hidden, generator=gen) * std).repeat_interleave(G, dim=0)


def random_shared(F: int, n: int, seed: int, layer: int) -> Tensor:
    """long [n]: a seeded random set of n of the F neurons, ascending."""
    return torch.randperm(F, generator=generator(seed, layer, -2, _SHARED_RANDOM))[:n].sort().values


def pack_mask(idx: Tensor, F: int) -> str:
    """The neuron set ``idx`` of F as a hex bitmask (neuron i is bit i): what the checkpoint records."""
    bits = torch.zeros(-(-F // 8) * 8, dtype=torch.bool)
    bits[idx] = True
    weights = 2 ** torch.arange(8)
    return bytes((bits.view(-1, 8).long() * weights).sum(1).tolist()).hex()


def unpack_mask(mask: str, F: int) -> list[int]:
    """The inverse of ``pack_mask``: ascending neuron ids."""
    data = bytes.fromhex(mask)
    return [i for i in range(F) if data[i // 8] >> (i % 8) & 1]


class ExpertMaker:
    """The tensors of one layer's routed experts and shared expert (see the module docstring).

    ``w_in_MD`` / ``w_down_DF`` / biases: the dense MLP in the experts' layout (``dense_weights``:
    gated rows :F gate, F: up). ``shared_idx``: long [F_s] ascending (empty: no shared expert). Experts
    are asked for in order, so one copy at a time is built and kept.
    """

    def __init__(self, cfg, layer: int, widths: Widths, shared_idx: Tensor, w_in_MD: Tensor, w_down_DF: Tensor,
                 b_in_M: Tensor | None, b_down_D: Tensor | None, *, gated: bool):
        self.cfg, self.layer, self.w, self.gated = cfg, layer, widths, gated
        self.w_in_MD, self.w_down_DF, self.b_in_M, self.b_down_D = w_in_MD, w_down_DF, b_in_M, b_down_D
        F = widths.dense
        keep = torch.ones(F, dtype=torch.bool)
        keep[shared_idx] = False
        self.shared_idx, self.routed_idx = shared_idx, keep.nonzero().squeeze(1)
        self._copy: tuple[int, dict] | None = None
        # Softmax-then-top-K (``weight_scaling``): K chosen probabilities sum to K/E under a uniform router.
        moe = cfg.moe
        self.routed_scale = moe.num_experts / moe.top_k if cfg.weight_scaling else 1.0

    def _gen(self, copy: int, what: int) -> torch.Generator:
        return generator(self.cfg.seed, self.layer, copy, what)

    def _rows(self, idx: Tensor) -> Tensor:
        """First-projection rows of neurons ``idx``: gated: their gate rows, then their up rows."""
        return torch.cat([idx, idx + self.w.dense]) if self.gated else idx

    def _order(self, copy: int) -> Tensor:
        """The dense neuron ids copy ``copy`` holds, in its order."""
        if not self.cfg.permute_copies:
            return self.routed_idx
        return self.routed_idx[torch.randperm(self.w.routed, generator=self._gen(copy, _PERMUTE))]

    def _build_copy(self, copy: int) -> dict:
        """Copy ``copy``'s routed weights at the dense scale (noise, re-initialisation applied), unpadded."""
        cfg, F_r = self.cfg, self.w.routed
        order = self._order(copy)
        w_in, w_down = self.w_in_MD[self._rows(order)], self.w_down_DF[:, order]
        b_in = self.b_in_M[self._rows(order)] if self.b_in_M is not None else None
        if cfg.reinit_ratio > 0 or cfg.expert_noise > 0:
            w_in, w_down = w_in.float(), w_down.float()
            n = int(round(cfg.reinit_ratio * F_r))
            cols = torch.randperm(F_r, generator=self._gen(copy, _DROP_COLS))[:n] if cfg.reinit_ratio > 0 else None
            if cols is not None and len(cols):
                # Drop-Upcycling: re-draw the chosen units from N(mean, std) of the dense tensor.
                rows = torch.cat([cols, cols + F_r]) if self.gated else cols
                ref_in, ref_down = self.w_in_MD.float(), self.w_down_DF.float()
                new = torch.randn(len(rows), w_in.shape[1], generator=self._gen(copy, _DROP_UP))
                w_in[rows] = new * ref_in.std() + ref_in.mean()
                new = torch.randn(w_down.shape[0], len(cols), generator=self._gen(copy, _DROP_DOWN))
                w_down[:, cols] = new * ref_down.std() + ref_down.mean()
            if cfg.expert_noise > 0:
                w_in = w_in + cfg.expert_noise * torch.randn(w_in.shape, generator=self._gen(copy, _NOISE_UP))
                w_down = w_down + cfg.expert_noise * torch.randn(w_down.shape, generator=self._gen(copy, _NOISE_DOWN))
        return {"up": w_in, "down": w_down, "up_bias": b_in}

    def _segment(self, copy: int, g: int) -> dict:
        if self._copy is None or self._copy[0] != copy:
            self._copy = (copy, self._build_copy(copy))
        c = self._copy[1]
        G, F_r, F_e = self.w.granularity, self.w.routed, self.w.expert
        sizes = [len(t) for t in torch.arange(F_r).tensor_split(G)]
        start, n = sum(sizes[:g]), sizes[g]
        pad = F_e - n
        cols = torch.arange(start, start + n)
        out = {"down": torch.nn.functional.pad(c["down"][:, cols], (0, pad))}
        halves = [c["up"][cols], c["up"][cols + F_r]] if self.gated else [c["up"][cols]]
        out["up"] = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, pad)) for h in halves])
        if c["up_bias"] is not None:
            bh = [c["up_bias"][cols], c["up_bias"][cols + F_r]] if self.gated else [c["up_bias"][cols]]
            out["up_bias"] = torch.cat([torch.nn.functional.pad(b, (0, pad)) for b in bh])
        return out

    def expert(self, j: int, which: str, dtype: torch.dtype) -> Tensor:
        """Expert ``j`` (segment j % G of copy j // G): ``up`` [M_e, D], ``down`` [D, F_e], ``up_bias``
        [M_e], ``down_bias`` [D], in ``dtype``."""
        G, s = self.w.granularity, self.routed_scale
        if which == "down_bias":
            b = self.b_down_D if self.w.shared == 0 else torch.zeros_like(self.b_down_D)
            return (b.float() * s).to(dtype) if s != 1 else b.to(dtype)
        t = self._segment(j // G, j % G)[which]
        if which == "down" and G * s != 1:
            # The segment's 1/G share of its copy's weight given back (module docstring), times E/K with
            # weight scaling: the one place a scale is exact for every MLP form.
            t = t.float() * (G * s)
        return t.to(dtype)

    def shared(self, which: str, dtype: torch.dtype) -> Tensor:
        """The shared expert's ``gate`` / ``up`` [F_s, D], ``down`` [D, F_s], ``gate_bias`` / ``up_bias``
        [F_s], ``down_bias`` [D] (the dense one): its neurons as they are."""
        idx, F = self.shared_idx, self.w.dense
        if which == "down":
            return self.w_down_DF[:, idx].to(dtype)
        if which == "down_bias":
            return self.b_down_D.to(dtype)
        src = self.b_in_M if which.endswith("_bias") else self.w_in_MD
        # gated: rows :F are the gate, F: the up projection; non-gated: the up projection alone.
        rows = idx + F if self.gated and which.startswith("up") else idx
        return src[rows].to(dtype)
