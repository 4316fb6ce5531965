"""Expert parallelism in the trainer: the 2-D layout, the sharded model, gradients, clipping, checkpoints.

    torchrun --nproc-per-node 4 -m upcycle train continued_pretraining distributed=fsdp expert_parallel=4
    torchrun --nproc-per-node 4 -m upcycle train lora_sft expert_parallel=2          # DDP, 2 replicas of 2

Layout (torchtitan's ep x efsdp): the W ranks form a DeviceMesh ("edp", "ep") of shape (W/N, N),
rank = edp * N + ep. Along "ep", N consecutive ranks split the experts of every MoE layer (rank ep
holds E/N whole experts, a contiguous range; ``upcycle.moe.expert_parallel`` sends the tokens);
along "edp", the W/N ranks holding the same experts are data-parallel replicas of them.

* Attention, embeddings, norms, routers, a shared expert: data-parallel over all W ranks, as
  without expert parallelism (DDP, or FSDP2 ``fully_shard`` per decoder layer).
* Experts: FSDP2-sharded over their "edp" replicas (``distributed: fsdp``), or replicated there
  with one all-reduce of their gradients per step after the last micro-batch (``ddp``; DDP
  itself ignores them: each rank's differ). Without replicas (N = W) they are plain tensors
  under either strategy (FSDP2 ignores them): nothing to shard them over or reduce them with.
* Gradient scale: every rank's loss is multiplied by W (the trainer's rule, so that DDP's and
  FSDP's averages over W give the global batch's gradient). An expert's gradient already holds
  the tokens of all N ranks of its group (they were sent to it), so summing it over its W/N
  replicas gives W times the global gradient: it is divided by W, not by W/N (FSDP2's
  ``set_gradient_divide_factor(W)``, torchtitan's rule).
* Clipping: the global norm over all parameters exactly once: each rank adds the squares of what
  it holds (a shard counts everywhere; a replica only on the first rank of its replicas), one
  all-reduce in float64 over all ranks.
* Checkpoints: the one-process format. Every per-expert tensor (weights, LoRA, AdamW moments) is
  gathered over its "ep" group to rank 0 and concatenated along experts; a resume at any layout
  cuts its own range back out, so world 4 / expert 4 resumes at world 2 / expert 2 or in one
  process, bit for bit.

Refused, in one line before the model loads: N not dividing the world or a layer's experts, a
dense model, ``experts_subset`` (ESFT's checkpoint is written from rank 0's own experts),
bitsandbytes optimizers (their block-quantised state of a sharded tensor does not cut or join
along experts). Not refused: LoRA / QLoRA on the experts (each adapter lives with its expert),
a shared base, NF4, activation checkpointing, gradient accumulation.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from upcycle.errors import UpcycleError
from upcycle.moe.block import moe_blocks
from upcycle.moe.expert_parallel import ExpertParallel, agree_on_batches, local_range, shard_stacked
from upcycle.moe.experts import StackedExperts

_LORA = ("lora_A_in", "lora_B_in", "lora_A_down", "lora_B_down")


def check_request(cfg, world: int) -> None:
    """UpcycleError if ``cfg.expert_parallel`` cannot run on ``world`` processes (before anything loads)."""
    N = cfg.expert_parallel
    if N == 1:
        return
    if cfg.experts_subset is not None:
        raise UpcycleError("expert_parallel with experts_subset is not supported: an ESFT checkpoint is written from "
                           "rank 0's own experts, which expert parallelism shards; train the subset without it")
    if cfg.optim.name != "adamw":
        raise UpcycleError(f"expert_parallel with optim.name={cfg.optim.name} is not supported: its block-quantised "
                           "state of a sharded expert does not cut or join along experts; use optim.name=adamw")
    experts = _num_experts_on_disk(cfg.model)
    if experts is not None and experts % N:
        raise UpcycleError(f"expert_parallel={N} must divide the number of experts of every MoE layer; "
                           f"{cfg.model} has {experts}")
    if world % N:
        raise UpcycleError(f"expert_parallel={N} needs a multiple of {N} processes (torchrun --nproc-per-node "
                           f"{N} ...), this run has {world}")


def check_model(model: nn.Module, cfg) -> None:
    """UpcycleError unless ``cfg.expert_parallel`` divides the experts of every MoE layer of the loaded ``model``."""
    N = cfg.expert_parallel
    if N == 1:
        return
    blocks = moe_blocks(model)
    if not blocks:
        raise UpcycleError(f"expert_parallel={N} needs an MoE model; {cfg.model} has no MoE layer")
    for block in blocks.values():
        local_range(block.cfg.num_experts, 0, N)


def _num_experts_on_disk(model: str) -> int | None:
    """Experts per layer from an upcycled checkpoint's config.json (None if not one: judged after loading)."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            return int(json.load(f)["upcycle"]["moe"]["num_experts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class ExpertLayout:
    """Where the experts are: the mesh, this rank's coordinates, and what was cut along experts."""

    size: int
    """N: ranks per expert-parallel group."""
    world: int
    strategy: str
    """``ddp`` or ``fsdp``: how the rest of the model, and the experts' replicas, are data-parallel."""
    mesh: object
    """DeviceMesh ("edp", "ep") of shape (world / N, N)."""
    dispatchers: dict[str, ExpertParallel] = field(default_factory=dict)
    """MoE block name -> its dispatcher."""
    per_expert: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Qualified name of every tensor cut along experts (parameters and state-dict entries) -> (lo, hi)."""
    expert_modules: dict[str, nn.Module] = field(default_factory=dict)
    """MoE block name -> its (sharded) experts module."""
    num_experts: dict[str, int] = field(default_factory=dict)

    @property
    def ep_group(self):
        return self.mesh["ep"].get_group()

    @property
    def edp_group(self):
        return self.mesh["edp"].get_group()

    @property
    def ep_rank(self) -> int:
        return self.mesh["ep"].get_local_rank()

    @property
    def edp_rank(self) -> int:
        return self.mesh["edp"].get_local_rank()

    @property
    def replicas(self) -> int:
        return self.world // self.size

    @property
    def experts_fsdp(self) -> bool:
        """The experts are FSDP2-sharded over their replicas (``fsdp`` with replicas to shard over); else they
        are plain tensors whose gradients ``reduce_expert_grads`` reduces once per step."""
        return self.strategy == "fsdp" and self.replicas > 1

    def describe(self) -> str:
        E = sorted(set(self.num_experts.values()))
        per = ", ".join(f"{e // self.size} of {e}" for e in E)
        rest = "FSDP2 over all ranks" if self.strategy == "fsdp" else "DDP over all ranks"
        if self.replicas == 1:
            experts = "no replica"
        else:
            how = "FSDP2-sharded over" if self.experts_fsdp else "replicated on"
            experts = f"{how} {self.replicas} ranks"
        return (f"expert parallel: {self.replicas} group(s) of {self.size} consecutive ranks; each rank holds {per} "
                f"experts per MoE layer ({experts}); the rest of the model: {rest}")

    def traffic(self) -> dict[str, int]:
        """Bytes this rank sent to other ranks through the dispatchers (see ``ExpertParallel.traffic``), summed."""
        out: dict[str, int] = {}
        for ep in self.dispatchers.values():
            for k, v in ep.traffic.items():
                out[k] = out.get(k, 0) + v
        return out

    def reset_traffic(self) -> None:
        for ep in self.dispatchers.values():
            for k in ep.traffic:
                ep.traffic[k] = 0

    # ---- gradients --------------------------------------------------------------------------
    def expert_params(self) -> list[nn.Parameter]:
        return [p for m in self.expert_modules.values() for p in m.parameters() if p.requires_grad]

    def reduce_expert_grads(self) -> None:
        """Unless FSDP2 reduces them (``experts_fsdp``): sum the experts' gradients over their replicas (if any)
        and divide by the world (module docstring). Once per step, after the last micro-batch."""
        params = self.expert_params()
        if not params:
            return
        for p in params:  # the dispatcher gives every local expert a gradient; kept safe for any future path
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if self.replicas > 1:
            dist.all_reduce(flat, group=self.edp_group)
        flat.div_(self.world)
        i = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip every gradient by the global norm (each element counted once over all ranks); returns it."""
        expert = {id(p) for p in self.expert_params()}
        rank = dist.get_rank()
        sq = torch.zeros((), dtype=torch.float64, device=_device_of(model))
        local = []
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad
            if isinstance(g, DTensor):
                coords = g.device_mesh.get_coordinate() or []
                mine = all(c == 0 for c, pl in zip(coords, g.placements) if isinstance(pl, Replicate))
                g = g.to_local()
            elif id(p) in expert:
                mine = self.edp_rank == 0  # replicated over its edp replicas
            else:
                mine = rank == 0  # DDP: replicated over every rank
            local.append(g)
            if mine and g.numel():
                sq += torch.linalg.vector_norm(g, dtype=torch.float64).square()
        dist.all_reduce(sq)
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
        if coef < 1.0:
            torch._foreach_mul_(local, coef)
        return norm

    # ---- checkpoints ------------------------------------------------------------------------
    def _gather(self, name: str, t: torch.Tensor, main: bool) -> torch.Tensor | None:
        """The one-process tensor behind this rank's ``t`` (on the main process; None elsewhere)."""
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if name in self.per_expert:
            if self.edp_rank != 0:  # the first replica group holds every expert once: it gathers
                return None
            parts = [torch.empty_like(t) for _ in range(self.size)] if self.ep_rank == 0 else None
            dist.gather(t.contiguous(), parts, group_dst=0, group=self.ep_group)
            t = torch.cat(parts) if parts is not None else None
        return t.detach().cpu() if main and t is not None else None

    def full_tensors(self, named: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
        """{name: tensor} as one process would hold it (a collective: every rank calls it with the same names)."""
        out = {}
        for name, t in named.items():
            full = self._gather(name, t, main)
            if main:
                out[name] = full
        return out

    def full_model_state_dict(self, model: nn.Module, main: bool) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
        return self.full_tensors(sd, main)

    def full_optimizer_state_dict(self, model: nn.Module, optimizer, main: bool) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))
        state = {}
        for fqn in sorted(osd["state"]):  # the same order on every rank: each entry is a collective
            entry = {}
            for k, v in osd["state"][fqn].items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    v = self._gather(fqn, v, main)
                elif isinstance(v, DTensor):
                    v = v.full_tensor()
                entry[k] = v
            state[fqn] = entry
        return {"state": state, "param_groups": osd["param_groups"]} if main else {}

    def local_optimizer_state(self, full: dict) -> dict:
        """A one-process optimizer state dict with this rank's experts cut out of every per-expert entry."""
        state = {}
        for fqn, entry in full["state"].items():
            if fqn in self.per_expert:
                lo, hi = self.per_expert[fqn]
                entry = {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in entry.items()}
            state[fqn] = entry
        return {**full, "state": state}

    @contextlib.contextmanager
    def whole_adapters(self, inner: nn.Module, main: bool):
        """Inside, the main process's expert adapters hold all E experts (gathered), as an adapter save reads
        them; every process must enter it (the gather is a collective)."""
        swapped = []
        for block_name, experts in self.expert_modules.items():
            for name in _LORA:
                p = getattr(experts, name, None)
                if p is None:
                    continue
                full = self._gather(f"{block_name}.experts.{name}", p.detach(), main)
                if main:
                    swapped.append((experts, name, p))
                    setattr(experts, name, nn.Parameter(full.to(p.device), requires_grad=False))
            if main:
                for m in _storages(experts):
                    swapped.append((m, "num_experts", m.num_experts))
                    m.num_experts = self.num_experts[block_name]
        try:
            yield
        finally:
            for m, name, old in reversed(swapped):
                setattr(m, name, old)


def full_gradients(model: nn.Module, d, layout: ExpertLayout | None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as one process would hold it, by checkpoint name, on the main process ({}
    elsewhere): gathered from FSDP2 shards and expert-parallel ranks. A collective: every process calls it."""
    named = {name.removeprefix("module."): p.grad for name, p in model.named_parameters() if p.grad is not None}
    if layout is not None:
        return layout.full_tensors(named, d.main)
    full = {k: (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu() for k, g in named.items()}
    return full if d.main else {}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.device if p.device.type != "meta" else torch.device("cpu")


def _storages(experts: nn.Module) -> list[nn.Module]:
    """The experts module and the storage inside a LoRA wrapper: whatever carries ``num_experts`` as its own."""
    out = [experts]
    base = getattr(experts, "base_layer", None)
    if base is not None:
        out.append(base)
    return [m for m in out if "num_experts" in vars(m)]


def _shard_storage(experts: nn.Module, lo: int, hi: int) -> tuple[nn.Module, list[str]]:
    """``experts`` cut to experts lo:hi, and the names (relative to it) of the tensors cut along experts."""
    from upcycle.adapters.lora import LoraExperts
    from upcycle.adapters.qlora import NF4StackedExperts
    from upcycle.adapters.shared import SharedStackedExperts

    if isinstance(experts, LoraExperts):
        if experts.expert_ids is not None:
            raise UpcycleError("expert_parallel cannot shard an adapter on a subset of the experts")
        base, names = _shard_storage(experts.base_layer, lo, hi)
        experts.base_layer = base
        for name in _LORA:
            p = getattr(experts, name)
            setattr(experts, name, nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad))
        return experts, [f"base_layer.{n}" for n in names] + list(_LORA)
    if type(experts) is StackedExperts:
        shard_stacked(experts, lo, hi)
        return experts, [n for n, _ in experts.named_parameters(recurse=False)]
    if isinstance(experts, SharedStackedExperts):  # one stored expert seen E times: only the count changes
        experts.num_experts = hi - lo
        return experts, list(experts.state_dict())  # the [E, ...] views it saves under checkpoint names
    if isinstance(experts, NF4StackedExperts):
        from upcycle.train.nf4_shard import shard_nf4

        return shard_nf4(experts, lo, hi)
    raise UpcycleError(f"expert_parallel cannot shard experts stored as {type(experts).__name__}")


def build_layout(model: nn.Module, d, cfg) -> ExpertLayout | None:
    """Shard ``model``'s experts for ``cfg.expert_parallel`` (before DDP / FSDP wrap it); None without it."""
    N = cfg.expert_parallel
    if N == 1 or not d.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    check_model(model, cfg)
    blocks = moe_blocks(model)
    mesh = init_device_mesh(d.device.type, (d.world // N, N), mesh_dim_names=("edp", "ep"))
    layout = ExpertLayout(size=N, world=d.world, strategy=cfg.distributed, mesh=mesh)
    group = layout.ep_group
    for name, block in blocks.items():
        ep = ExpertParallel(group, block.cfg.num_experts)
        block.experts, names = _shard_storage(block.experts, ep.lo, ep.hi)
        block.expert_parallel = ep
        layout.dispatchers[name] = ep
        layout.expert_modules[name] = block.experts
        layout.num_experts[name] = block.cfg.num_experts
        layout.per_expert.update({f"{name}.experts.{n}": (ep.lo, ep.hi) for n in names})
    agree_on_batches(model, list(layout.dispatchers.values()), d.device)
    return layout


def wrap(model: nn.Module, d, layout: ExpertLayout) -> nn.Module:
    """DDP or FSDP2 for a model whose experts ``build_layout`` sharded (see the module docstring)."""
    if layout.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ignore = [f"{block}.experts.{n}" for block, m in layout.expert_modules.items()
                  for n, _ in (*m.named_parameters(), *m.named_buffers())]
        # Every rank holds other experts: DDP must neither broadcast them at start nor average their gradients.
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    from upcycle.train.model import decoder_layers

    ignored = None
    if layout.experts_fsdp:
        for experts in layout.expert_modules.values():
            fully_shard(experts, mesh=layout.mesh["edp"])
            experts.set_gradient_divide_factor(float(layout.world))
            # A custom factor makes FSDP2 reduce with PREMUL_SUM, which gloo lacks (and which had bugs on NCCL,
            # pytorch#155915): a plain SUM and one division afterwards instead.
            experts.set_force_sum_reduction_for_comms(True)
    else:  # no replicas to shard over: plain tensors, their gradients divided by the world after the last micro-batch
        ignored = {p for m in layout.expert_modules.values() for p in m.parameters()}
    for layer in decoder_layers(model):
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


__all__ = ["ExpertLayout", "build_layout", "check_model", "check_request", "full_gradients", "wrap"]
