"""What the trainer records: routing telemetry per MoE layer, and the metrics file.

Routing, per MoE layer and logging window (all micro-batches of ``log_every`` steps, all
processes): ``load`` (fraction of assignments per expert), ``load_min`` / ``load_max``
(times E: 1.0 is perfectly balanced), ``load_entropy`` (entropy of ``load`` / log E),
``dropped`` (assignments over capacity), ``unrouted`` (tokens with no expert), ``z`` (mean
squared router logsumexp), ``router_entropy`` (mean per-token entropy, nats), and
``dead_experts`` (experts that got no token in the window; a warning names them). Fine-grained
experts (granularity G > 1) add ``copy_load_min`` / ``copy_load_max`` (per copy of the dense MLP,
times the number of copies), ``copies_per_token`` and ``degrouped`` (tokens whose K choices span
more than K / G copies: how far the segments have come apart).

``metrics.jsonl``: one JSON object per line, ``{"type": "train" | "eval" | "meta", "step": ...}``.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import torch
from torch import nn

from upcycle.io import atomic_path
from upcycle.moe.block import moe_blocks

# Per layer and window: tokens-per-expert counts, then token-weighted sums of the fractions.
_EXTRA = ("num_tokens", "dropped", "unrouted", "router_entropy", "z", "copies_per_token", "degrouped")


class RoutingTelemetry:
    """Accumulates the MoE blocks' routing statistics over micro-batches and processes."""

    def __init__(self, model: nn.Module, warn: bool = True):
        self.warn = warn  # under torchrun only the main process warns
        self.blocks = moe_blocks(model)
        self.names = [n.removeprefix("module.") for n in self.blocks]  # DDP's wrapper prefix
        E = max((b.cfg.num_experts for b in self.blocks.values()), default=0)
        self.sums = torch.zeros(len(self.blocks), E + len(_EXTRA), dtype=torch.float64)
        self._warned: dict[str, set[int]] = {}

    def restore(self, saved: torch.Tensor) -> None:
        """Continue a logging window from a checkpoint's sums. Ones saved before the fine-grained
        columns existed (two fewer extras, zero for every model then) are widened with zeros."""
        if saved.shape[1] == self.sums.shape[1] - 2:
            saved = torch.cat([saved, saved.new_zeros(saved.shape[0], 2)], dim=1)
        self.sums.copy_(saved)

    def record(self) -> None:
        """Add the latest forward pass of every block (call after each training micro-batch)."""
        for i, block in enumerate(self.blocks.values()):
            s = block.last_stats
            if s is None:
                continue
            n = s.num_tokens
            E = len(s.tokens_per_expert)
            self.sums[i, :E] += torch.tensor(s.tokens_per_expert, dtype=torch.float64)
            self.sums[i, -len(_EXTRA):] += torch.tensor(
                [n, s.dropped_fraction * n, s.unrouted_fraction * n, s.entropy * n, s.z * n,
                 (s.copies_per_token or 0.0) * n, (s.degrouped_fraction or 0.0) * n], dtype=torch.float64)

    def summary(self, all_sum) -> dict[str, dict]:
        """The window's statistics per layer (summed over processes with ``all_sum``), then reset."""
        if not self.blocks:
            return {}
        sums = all_sum(self.sums.clone())
        self.sums.zero_()
        out, newly_dead = {}, {}
        for i, (name, block) in enumerate(zip(self.names, self.blocks.values())):
            E = block.cfg.num_experts
            counts = sums[i, :E]
            n, dropped, unrouted, ent, z, copies, degrouped = sums[i, -len(_EXTRA):].tolist()
            total = counts.sum().item()
            load = (counts / total).tolist() if total else [0.0] * E
            nonzero = [p for p in load if p > 0]
            dead = [e for e, c in enumerate(counts.tolist()) if c == 0]
            out[name] = {
                "load": [round(p, 6) for p in load],
                "load_min": min(load) * E, "load_max": max(load) * E,
                "load_entropy": -sum(p * math.log(p) for p in nonzero) / math.log(E),
                "dropped": dropped / n if n else 0.0, "unrouted": unrouted / n if n else 0.0,
                "router_entropy": ent / n if n else 0.0, "z": z / n if n else 0.0,
                "dead_experts": len(dead),
            }
            G = block.cfg.granularity
            if G > 1 and block.cfg.routing == "topk":
                copy_load = counts.view(-1, G).sum(1) / total if total else torch.zeros(E // G)
                out[name].update(copy_load_min=copy_load.min().item() * (E // G),
                                 copy_load_max=copy_load.max().item() * (E // G),
                                 copies_per_token=copies / n if n else 0.0, degrouped=degrouped / n if n else 0.0)
            if total:
                newly_dead[name] = sorted(set(dead) - self._warned.setdefault(name, set()))
                self._warned[name].update(dead)
        self._warn_dead({k: v for k, v in newly_dead.items() if v})
        return out

    def _warn_dead(self, newly_dead: dict[str, list[int]]) -> None:
        # One line per window, and each expert named once per run: a collapsed router would
        # otherwise repeat the same warning every window.
        if not (newly_dead and self.warn):
            return
        parts = [f"{name} ({', '.join(map(str, ids[:8]))}{' ...' if len(ids) > 8 else ''})"
                 for name, ids in newly_dead.items()]
        warnings.warn(f"experts got no tokens in the last logging window: {'; '.join(parts)}; dead experts waste "
                      "capacity: raise aux_loss_weight or the router learning rate", stacklevel=3)


class MetricsWriter:
    """Appends JSON lines to ``out/metrics.jsonl`` (and TensorBoard scalars when available)."""

    def __init__(self, out: str, tensorboard: bool, resume_step: int | None):
        self.path = os.path.join(out, "metrics.jsonl")
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSONL file is the record
                pass
            else:
                self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old lines."""
        if not os.path.isfile(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short when the process was killed
                    continue
                if row.get("type") == "meta" or row.get("step", 0) <= step:
                    keep.append(json.dumps(row) + "\n")
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in row:
            kind = row.get("type", "train")
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "type"):
                    self.tb.add_scalar(f"{kind}/{k}", v, row["step"])
            for layer, r in (row.get("routing") or {}).items():
                for k in ("load_min", "load_max", "load_entropy", "dropped", "z", "degrouped"):
                    if k in r:
                        self.tb.add_scalar(f"routing/{layer}/{k}", r[k], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
