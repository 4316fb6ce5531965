"""Training configuration: typed dataclasses, and recipes (YAML) with ``a.b=c`` overrides.

    cfg = load_recipe("lima_sft", ["optim.lr=2e-5", "out=runs/lima-2"])

A recipe is a YAML file mirroring ``TrainConfig``; a built-in name (``continued_pretraining``)
resolves to the YAML shipped inside the package. Unknown keys and wrong types are errors
that list the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from upcycle.adapters.config import LoraConfig
from upcycle.moe.backends import EXPERT_BACKENDS
from upcycle.config import from_dict
from upcycle.data.config import DataConfig
from upcycle.errors import UpcycleError


OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
"""``optim.name`` values (``upcycle.train.optim.OPTIMIZERS`` builds each)."""


@dataclass
class OptimConfig:
    """AdamW (fp32 state, or bitsandbytes' 8-bit / paged), with its own learning rate for each kind of parameter."""

    name: OptimizerName = "adamw"
    """``adamw``: torch's AdamW, fp32 state. ``adamw_8bit``: bitsandbytes' AdamW8bit (block-wise
    8-bit state, about a quarter of the memory; tensors under 4,096 elements keep fp32 state).
    ``paged_adamw`` / ``paged_adamw_8bit``: the same with the state in CUDA unified memory,
    paged to the CPU under memory pressure (QLoRA's paged optimizers); on the CPU bitsandbytes
    runs them unpaged. All but ``adamw`` need bitsandbytes (``pip install 'upcycle[qlora]'``)."""
    lr: float = 1e-4
    """Peak learning rate of the parameters no other group claims (attention, norms, embeddings, dense MLPs)."""
    router_lr: float | None = None
    """Peak learning rate of the MoE routers (None: ``lr``)."""
    experts_lr: float | None = None
    """Peak learning rate of the MoE experts, a shared expert included (None: ``lr``)."""
    adapter_lr: float | None = None
    """Peak learning rate of LoRA adapters (None: ``lr``)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to biases, norms or the router)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then a decay to ``min_lr_ratio`` times the peak."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 to the peak."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup, over the remaining steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of each group's peak."""


@dataclass
class ExpertsSubsetConfig:
    """Expert-specialised fine-tuning (ESFT, Wang et al. 2024): train only the experts the task's data routes to.

    Before training, a sample of the training set is routed through the model; per MoE layer the
    experts are ranked by what they received and the best are chosen (``coverage`` or ``top``).
    Only they are trained (with ``lora``: only they get adapters); the others stay bit for bit.
    The choice is printed, written to ``out/experts_subset.json`` and reused as is on resume.
    """

    by: Literal["load", "tokens"] = "load"
    """What ranks an expert: ``load``, the routed (combine) weight it receives, summed over the
    sample's tokens (ESFT's average gate score); ``tokens``, how many tokens are routed to it
    (ESFT's token selection ratio)."""
    coverage: float | None = None
    """Per MoE layer, the smallest set of experts that receives at least this share (0 < c <= 1)
    of the layer's total. Give exactly one of ``coverage`` and ``top``."""
    top: int | None = None
    """Per MoE layer, the ``top`` experts that receive the most."""
    sample: int = 256
    """Training sequences routed to choose them: the first of the run's shuffled order (all if fewer)."""
    train_router: bool = False
    """Also train the routers fully. With ``lora``, ``lora.train_router`` decides instead."""
    train_attention: bool = False
    """Also train the attention layers fully. With ``lora``, ``lora.target_modules`` decides instead."""

    def validate(self, lora: bool) -> None:
        if (self.coverage is None) == (self.top is None):
            raise UpcycleError("experts_subset: give exactly one of coverage (a share of the routed load, e.g. 0.8) "
                               "and top (experts per layer)")
        if self.coverage is not None and not 0 < self.coverage <= 1:
            raise UpcycleError(f"experts_subset.coverage must be in (0, 1], got {self.coverage}")
        if self.top is not None and self.top < 1:
            raise UpcycleError(f"experts_subset.top must be at least 1, got {self.top}")
        if self.sample < 1:
            raise UpcycleError(f"experts_subset.sample must be at least 1, got {self.sample}")
        if lora and (self.train_router or self.train_attention):
            what = "train_router" if self.train_router else "train_attention"
            raise UpcycleError(f"experts_subset.{what} is for full fine-tuning; with lora, lora.train_router and "
                               "lora.target_modules decide what else trains")


@dataclass
class TrainConfig:
    """One training run: model, data, optimisation, checkpoints. Recipes mirror this."""

    model: str = "runs/smollm2-135m-L6-E32"
    """An upcycled checkpoint directory, or any dense source ``upcycle convert --model`` accepts."""
    out: str = "runs/train"
    """Run directory: recipe.yaml, metrics.jsonl, checkpoints/, plots/."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    seed: int = 0
    """Seed for data order, adapter init and dropout. Same seed, same run (bit for bit on CPU)."""
    batch_size: int = 16
    """Global batch: sequences per optimiser step, over all processes and accumulation steps."""
    micro_batch_size: int = 4
    """Sequences per forward pass per process; gradient accumulation makes up the rest."""
    max_steps: int | None = None
    """Optimiser steps to run. Exactly one of ``max_steps`` and ``epochs``."""
    epochs: int | None = None
    """Passes over the training set (a last incomplete global batch is left out)."""
    log_every: int = 10
    """Steps between metrics lines (and routing telemetry windows)."""
    eval_every: int | None = 100
    """Steps between held-out evaluations (also at the end). None: only at the end."""
    eval_at_start: bool = False
    """Also evaluate before the first step (the starting point of the held-out curve)."""
    eval_batches: int | None = None
    """Micro-batches of held-out data per evaluation (None: all of it)."""
    save_every: int | None = 500
    """Steps between checkpoints (also at the end). None: only at the end and per epoch if asked."""
    save_every_epoch: bool = False
    """Also checkpoint at the end of every epoch from ``save_from_epoch`` on (LIMA's selection)."""
    save_from_epoch: int = 1
    """First epoch (1-based) whose end gets a checkpoint with ``save_every_epoch``."""
    keep_last: int | None = 2
    """Checkpoints kept (oldest deleted first); None keeps all. Epoch checkpoints count too."""
    checkpoint: Literal["auto", "full", "adapter"] = "auto"
    """What a checkpoint holds: the whole model, or only the adapter (``auto``: the adapter with ``lora``;
    with ``experts_subset`` and no ``lora``, the trained experts and modules only: an ESFT checkpoint)."""
    resume: str | None = None
    """Continue a run: a checkpoint directory, or ``auto`` for the latest one in ``out``."""
    overwrite: bool = False
    """Start afresh in an existing ``out`` (its checkpoints and metrics are deleted)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on a GPU that supports it, fp32 otherwise. Weights stay fp32."""
    device: str | None = None
    """``cpu`` or ``cuda`` (None: cuda if available). Under torchrun each process takes its LOCAL_RANK GPU."""
    experts_backend: str = "auto"
    """MoE experts backend: auto, loop, grouped_mm, triton."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: less memory, about 1/3 more compute."""
    residual_dropout: float = 0.0
    """Dropout on every layer's attention and MLP output, rising linearly from 0 at the first
    layer to this at the last (LIMA: 0.3, 0.2 for smaller models)."""
    aux_loss_weight: float | None = None
    """Override the checkpoint's load-balancing loss weight (None: keep it)."""
    z_loss_weight: float | None = None
    """Override the checkpoint's router z-loss weight (None: keep it)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of the whole model (everything else frozen)."""
    nf4: bool = False
    """QLoRA: quantise the frozen base (attention projections and experts) to NF4; needs ``lora``."""
    experts_subset: ExpertsSubsetConfig | None = None
    """Train only the experts the training data routes to (ESFT), e.g. ``{by: load, coverage: 0.8}``;
    checkpoints then hold only what was trained (``upcycle merge`` / ``upcycle.load`` rebuild the model)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: replicate (DDP) or shard parameters, gradients and optimiser state (FSDP2)."""
    expert_parallel: int = 1
    """Under torchrun: split every MoE layer's experts over groups of this many consecutive processes
    (each holds E/N whole experts; tokens travel to them by all-to-all); the rest of the model, and each
    expert's replicas across groups, stay data-parallel as ``distributed`` says. 1: off. Must divide the
    number of processes and of experts."""
    progress: bool = True
    """Show a progress bar (loss, lr, tokens/s, ETA)."""
    tensorboard: bool = True
    """Also write TensorBoard events to ``out/tb`` when tensorboard is installed."""

    def validate(self) -> None:
        if self.seed < 0:
            raise UpcycleError(f"seed must be >= 0, got {self.seed}")
        if self.lora is not None and self.checkpoint == "full":
            raise UpcycleError("checkpoint: full with lora would save wrapped (or NF4) weights no loader reads; "
                               "use checkpoint: adapter (then upcycle merge)")
        if (self.max_steps is None) == (self.epochs is None):
            raise UpcycleError("give exactly one of max_steps and epochs")
        for name in ("batch_size", "micro_batch_size", "log_every", "max_steps", "epochs", "eval_every",
                     "eval_batches", "save_every", "keep_last", "save_from_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UpcycleError(f"{name} must be at least 1, got {value}")
        if self.batch_size % self.micro_batch_size:
            raise UpcycleError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                               f"({self.micro_batch_size})")
        o = self.optim
        for name in ("lr", "router_lr", "experts_lr", "adapter_lr", "eps", "weight_decay", "grad_clip"):
            value = getattr(o, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UpcycleError(f"optim.{name} must be a finite number >= 0, got {value}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise UpcycleError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        s = self.schedule
        if s.warmup_steps < 0:
            raise UpcycleError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        if not 0 <= s.min_lr_ratio <= 1:
            raise UpcycleError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        if not 0 <= self.residual_dropout < 1:
            raise UpcycleError(f"residual_dropout must be in [0, 1), got {self.residual_dropout}")
        for name in ("aux_loss_weight", "z_loss_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UpcycleError(f"{name} must be a finite number >= 0, got {value}")
        if self.experts_backend not in EXPERT_BACKENDS:
            raise UpcycleError(f"experts_backend must be one of {', '.join(EXPERT_BACKENDS)}, "
                               f"got {self.experts_backend!r}")
        if isinstance(self.expert_parallel, bool) or not (isinstance(self.expert_parallel, int) and self.expert_parallel >= 1):
            raise UpcycleError(f"expert_parallel must be a positive integer, got {self.expert_parallel!r}")
        if self.nf4 and self.lora is None:
            raise UpcycleError("nf4 (QLoRA) quantises a frozen base: it needs a lora section")
        if self.checkpoint == "adapter" and self.lora is None:
            raise UpcycleError("checkpoint: adapter needs a lora section")
        if self.device not in (None, "cpu", "cuda"):
            raise UpcycleError(f"device must be cpu or cuda, got {self.device!r}")
        if self.lora is not None:
            self.lora.validate()
        if self.experts_subset is not None:
            self.experts_subset.validate(lora=self.lora is not None)
            if self.lora is not None and not self.lora.experts:
                raise UpcycleError("experts_subset with lora puts adapters on the chosen experts: it needs "
                                   "lora.experts: true")
            if self.checkpoint == "full":
                raise UpcycleError("checkpoint: full with experts_subset would save every frozen expert again; use "
                                   "checkpoint: auto (what was trained only; upcycle merge rebuilds the model)")
        self.data.validate()

    @property
    def adapter_checkpoints(self) -> bool:
        return self.checkpoint == "adapter" or (self.checkpoint == "auto" and self.lora is not None)

    @property
    def checkpoint_kind(self) -> str:
        """``adapter``, ``esft`` (the trained experts and modules of a full ESFT run) or ``full``."""
        if self.adapter_checkpoints:
            return "adapter"
        return "esft" if self.experts_subset is not None else "full"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; recipes are full of learning rates written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _int_or_float(loader, node):
    text = loader.construct_scalar(node)
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    return loader.construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:float", _int_or_float)


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML (``3``, ``1e-4``, ``null``, ``[q_proj, v_proj]``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def recipes_dir() -> Path:
    """The built-in recipes: ``upcycle/recipes`` in an installed wheel, ``recipes/`` in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "recipes"
    # Not imported as ``upcycle.recipes``: in an editable install that mapping is a namespace
    # package, which the import system cannot always resolve.
    return installed if installed.is_dir() else package.parent / "recipes"


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(recipe: str) -> str:
    """A recipe argument as a file path: an existing YAML path, or a built-in name."""
    if os.path.isfile(recipe):
        return recipe
    if not recipe.endswith((".yaml", ".yml")) and os.sep not in recipe:
        path = recipes_dir() / f"{recipe}.yaml"
        if path.is_file():
            return str(path)
    raise UpcycleError(f"recipe not found: {recipe} (a YAML file, or one of: {', '.join(builtin_recipes())})")


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = tree.get(k)
        if node is None:
            node = tree[k] = {}
        elif not isinstance(node, dict):
            raise UpcycleError(f"override {dotted}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def load_recipe(recipe: str, overrides: list[str] = ()) -> TrainConfig:
    """``TrainConfig`` from a recipe (path or built-in name) and ``key=value`` overrides."""
    path = recipe_path(recipe)
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_Loader)
    except (OSError, yaml.YAMLError) as e:
        raise UpcycleError(f"cannot read recipe {path}: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UpcycleError(f"recipe {path} is not a mapping of settings")
    given = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise UpcycleError(f"override {item!r} is not key=value (e.g. optim.lr=2e-5)")
        _set(raw, key, parse_value(value))
        given.add(key)
    # max_steps and epochs are alternatives: giving one on the command line replaces the recipe's other.
    for key, other in (("max_steps", "epochs"), ("epochs", "max_steps")):
        if key in given and other not in given and raw.get(key) is not None:
            raw[other] = None
    cfg = from_dict(TrainConfig, raw, "recipe")
    cfg.validate()
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
