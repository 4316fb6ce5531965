"""Typed configuration: the single source of truth for what a setting means.

``MoEConfig`` is what an upcycled checkpoint stores (the ``upcycle`` section of
``config.json``) and what the MoE block is built from. ``ConvertConfig`` holds the
arguments of ``upcycle convert``. ``from_dict`` turns a plain mapping (JSON, YAML, CLI
``a.b=c`` overrides) into a dataclass and rejects unknown keys and wrong types.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from upcycle.errors import UpcycleError

RoutingName = Literal["topk", "expert-choice"]
SharedSelection = Literal["activation", "random"]
"""How the shared expert's neurons are chosen (``ConvertConfig.shared_selection``)."""
"""Routing schemes by name (each one an object in ``upcycle.moe.schemes``)."""
ECGroup = Literal["position", "sequence"]


@dataclass
class MoEConfig:
    """How one MoE layer routes tokens. Stored in the checkpoint; read by the MoE block."""

    num_experts: int
    """Experts per MoE layer, as the router sees them (>= 2). A fine-grained upcycle has E·G: E copies
    of the dense MLP, each split into ``granularity`` G segments."""
    routing: RoutingName = "topk"
    """``topk``: each token picks K experts. ``expert-choice``: each expert picks T tokens."""
    top_k: int = 2
    """Experts each token picks (top-K routing; 1 <= K <= ``num_experts``). Counts experts, as every
    MoE config does: a fine-grained upcycle picks K·G segments for K copies' worth."""
    normalize_topk: bool = True
    """Renormalise the K combine weights to sum to 1 (makes a fresh upcycle exact)."""
    topk_capacity_factor: float | None = None
    """Top-K only: None is dropless; a float c caps each expert at ceil(c * n * K / E)
    assignments per routing group (the batch) and drops the rest (those tokens keep the
    residual). Applied while training only: dropping depends on other tokens, later ones
    included, so evaluation and generation stay dropless and causal."""
    capacity: float = 2.0
    """Expert choice only: C; each expert takes T = min(n, ceil(C * n / E)) tokens of a group of n."""
    ec_group: ECGroup = "position"
    """Expert choice only: ``position`` groups the tokens of one position across the batch
    (causal); ``sequence`` groups the tokens of one sequence (the EC paper; not causal)."""
    aux_loss_weight: float = 0.01
    """Weight of the Switch load-balancing loss (top-K)."""
    z_loss_weight: float = 0.001
    """Weight of the router z-loss (mean squared logsumexp of the router logits)."""
    granularity: int = 1
    """G, segments per copy of the dense MLP (fine-grained upcycling, He et al. 2024): expert j is
    segment j % G of copy j // G. Describes how the experts were made (the routing itself is plain
    top-K over ``num_experts``); statistics report routing per copy with it. 1: every expert a whole copy."""

    @property
    def num_copies(self) -> int:
        """E: copies of the dense MLP (``num_experts`` // ``granularity``)."""
        return self.num_experts // self.granularity

    def validate(self) -> None:
        if not (isinstance(self.granularity, int) and self.granularity >= 1):
            raise UpcycleError(f"--granularity must be a positive integer, got {self.granularity!r}")
        if self.num_experts % self.granularity:
            raise UpcycleError(f"num_experts ({self.num_experts}) must be a multiple of the granularity "
                               f"({self.granularity}): experts are G segments of each copy")
        if self.num_experts < 2:
            raise UpcycleError(f"--experts must be at least 2, got {self.num_experts}")
        if self.routing not in typing.get_args(RoutingName):
            raise UpcycleError(f"--routing must be one of {', '.join(typing.get_args(RoutingName))}, got {self.routing!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise UpcycleError(
                f"--top-k must be between 1 and the number of experts ({self.num_experts}), got {self.top_k}"
            )
        if not (math.isfinite(self.capacity) and self.capacity > 0):
            raise UpcycleError(f"--capacity must be a positive number, got {self.capacity}")
        if self.topk_capacity_factor is not None and not (
            math.isfinite(self.topk_capacity_factor) and self.topk_capacity_factor > 0
        ):
            raise UpcycleError(f"--capacity-factor must be a positive number, got {self.topk_capacity_factor}")
        if self.ec_group not in ("position", "sequence"):
            raise UpcycleError(f"ec_group must be 'position' or 'sequence', got {self.ec_group!r}")
        for name in ("aux_loss_weight", "z_loss_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UpcycleError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


@dataclass
class ConvertConfig:
    """Arguments of ``upcycle convert`` / ``upcycle.convert``."""

    out: str
    """Output directory; must not exist unless ``overwrite``."""
    model: str = "smollm2-135m"
    """Source: a Hugging Face model directory, a .gguf file, a built-in alias, or a hub name."""
    layers: int | None = None
    """Upcycle the last N MLPs. Exactly one of ``layers`` / ``layer_ids``."""
    layer_ids: list[int] | None = None
    """Upcycle these MLPs (0-based layer indices)."""
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(num_experts=8))
    """Routing of the new MoE layers."""
    expert_noise: float = 0.0
    """Std of the Gaussian noise added to every expert copy's weights (absolute, not relative)."""
    reinit_ratio: float = 0.0
    """Drop-Upcycling: fraction R of each expert's FFN columns re-initialised (0 <= R <= 1)."""
    router_std: float = 0.02
    """Router weights ~ N(0, router_std)."""
    seed: int = 0
    """Seed for the router, the noise, the re-initialisation, the copies' permutations and a random shared set."""
    weight_scaling: bool = False
    """Softmax-then-top-K upcycling (He et al. 2024; needs ``moe.normalize_topk`` False): each routed
    expert's down projection (and bias) is multiplied by ``num_experts / top_k`` (E/K copies), the
    inverse of what K chosen probabilities sum to under a uniform router. The upcycle then equals the
    dense model only where the router is uniform: close at t=0, not exact (``router_std`` > 0). The
    scale lives in the weights, so an export that keeps raw top-K weights (qwen2_moe) is still exact."""
    permute_copies: bool = False
    """Fine-grained: each copy's routed neurons get their own seeded random order before the copy is
    split into ``moe.granularity`` segments, so segment g of two copies holds different neurons
    (diversity as Qwen's recipe seeks, and still exact: a copy's segments are always chosen together)."""
    shared_fraction: float | None = None
    """Share of each MLP's neurons that become one always-on shared expert (0 < f < 1), the rest routed.
    Rounded so that the routed width splits into segments that are multiples of 8 neurons where the MLP
    allows (the exact count is recorded). Exclusive with ``shared_neurons``; None: no shared expert."""
    shared_neurons: int | None = None
    """The shared expert's width in neurons, exactly (1 <= N <= F - G)."""
    shared_selection: SharedSelection = "activation"
    """``activation``: the neurons whose mean contribution |h_i| * ||down[:, i]|| over ``calibration``
    is largest in the dense model (the ones every token leans on); ``random``: a seeded random set."""
    calibration: str = "shakespeare"
    """Text the ``activation`` selection runs through the dense model: ``shakespeare`` (the embedded
    plays, held-out ones excluded) or a UTF-8 text file."""
    calibration_tokens: int = 4096
    """Tokens of ``calibration`` to run (one pass, streamed layer by layer)."""
    dtype: str | None = None
    """Stored precision: float32, bfloat16 or float16; None keeps the source's."""
    overwrite: bool = False
    """Replace an existing ``out`` (only once the new checkpoint is complete)."""
    max_shard_size: int = 2 * 1024**3
    """Bytes per output safetensors shard."""
    progress: bool = True
    """Show a progress bar."""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # a section: its own errors name the bad key
            return from_dict(sections[0], value, where)
        for arg in args:
            try:
                return _check_type(value, arg, where)
            except UpcycleError:
                continue
        raise UpcycleError(f"{where}: expected {tp}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise UpcycleError(f"{where}: expected one of {list(args)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise UpcycleError(f"{where}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UpcycleError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[]") for v in value]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise UpcycleError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise UpcycleError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UpcycleError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UpcycleError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
