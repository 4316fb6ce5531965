"""Dense -> MoE conversion, streamed tensor by tensor.

    upcycle convert --layers 6 --experts 32 --out runs/smollm2-moe

Shape legend: E experts, F expert FFN size, D hidden size.

The output tensor list is planned from the source's metadata before any data is read;
then each output tensor is produced from one source tensor (one MLP's three for an expert
tensor, written one expert at a time) and streamed into its shard. Output goes to a hidden
temporary directory beside ``out``, ``config.json`` is written last, and the directory is
renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from upcycle.config import ConvertConfig
from upcycle.errors import UpcycleError
from upcycle.io import atomic_dir, remove_stale
from upcycle.models.base import Source
from upcycle.modeling import register
from upcycle.models.recorded import record_source
from upcycle.models.sources import open_source
from upcycle.moe.schemes import routing_scheme
from upcycle.arch import ArchSpec, arch_spec, skeleton
from upcycle.surgery.calibrate import choose_shared
from upcycle.surgery.dense_mlp import check_layer, dense_biases, dense_weights, mlp_dims, resolve_form, source_names
from upcycle.surgery.segments import ExpertMaker, Widths, generator, plan_widths, router_rows
from upcycle.surgery.writer import ShardWriter, TensorSpec, plan_shards, shard_file_names, write_index
from upcycle.version import __version__

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SCALING_WARNING = (
    "softmax-then-top-K with weight scaling: the routed experts' down projections are multiplied by {scale:g} "
    "(E/K); the upcycle equals the dense model only where the router is uniform, so at t=0 it is close, not exact")


@dataclass
class ConvertResult:
    out: str
    layer_ids: list[int]
    num_experts: int
    bytes_written: int
    seconds: float
    peak_rss_mb: float
    widths: Widths | None = None
    """How each MLP's neurons were dealt out (copies, segments, shared expert)."""
    shared_score_share: dict | None = None
    """Per layer, the share of the calibration score the shared expert's neurons hold (``activation`` selection)."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


def resolve_layer_ids(cfg: ConvertConfig, num_layers: int) -> list[int]:
    if (cfg.layers is None) == (cfg.layer_ids is None):
        raise UpcycleError("give exactly one of --layers N or --layer-ids I,J,...")
    if cfg.layers is not None:
        if not 1 <= cfg.layers <= num_layers:
            raise UpcycleError(f"--layers must be between 1 and {num_layers} (the model's layer count), got {cfg.layers}")
        return list(range(num_layers - cfg.layers, num_layers))
    ids = list(cfg.layer_ids)
    if not ids:
        raise UpcycleError("--layer-ids is empty")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UpcycleError(f"--layer-ids has duplicates: {','.join(map(str, dup))}")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise UpcycleError(f"--layer-ids {','.join(map(str, bad))} out of range: the model has layers 0..{num_layers - 1}")
    return sorted(ids)


def _validate(cfg: ConvertConfig) -> None:
    moe = cfg.moe
    G = moe.granularity
    moe.validate()
    if G > 1 and moe.routing != "topk":
        # Expert choice ranks tokens per expert: the segments of a copy would not stay together.
        raise UpcycleError(f"--granularity {G} needs --routing topk: fine-grained experts are exact only when "
                           "each token takes its copy's segments together")
    if moe.num_copies < 2:
        raise UpcycleError(f"--experts must be at least 2 (copies of the MLP), got {moe.num_copies}")
    if moe.routing == "topk" and moe.top_k % G:
        raise UpcycleError(f"--top-k {moe.top_k} is not a multiple of --granularity {G}: top-K must take whole "
                           f"copies (K = G per copy) for the upcycle to equal the dense model; "
                           f"--top-k {G} has the dense model's FLOPs")
    if cfg.weight_scaling and (moe.routing != "topk" or moe.normalize_topk):
        raise UpcycleError("--weight-scaling needs --no-normalize (top-K routing): it compensates raw top-K "
                           "probabilities; renormalised weights are exact already, and scaling them would "
                           f"multiply the experts' output by {moe.num_experts / moe.top_k:g}")
    if cfg.permute_copies and G == 1:
        raise UpcycleError("--permute-copies needs --granularity > 1: reordering a whole copy's neurons changes "
                           "nothing (a permuted MLP is the same MLP)")
    if cfg.shared_fraction is not None and cfg.shared_neurons is not None:
        raise UpcycleError("give --shared-fraction or --shared-neurons, not both")
    if cfg.shared_fraction is not None and not (math.isfinite(cfg.shared_fraction) and 0 < cfg.shared_fraction < 1):
        raise UpcycleError(f"--shared-fraction must be between 0 and 1 (exclusive), got {cfg.shared_fraction}")
    if cfg.shared_neurons is not None and cfg.shared_neurons < 1:
        raise UpcycleError(f"--shared-neurons must be at least 1, got {cfg.shared_neurons}")
    if cfg.shared_selection not in ("activation", "random"):
        raise UpcycleError(f"--shared-selection must be activation or random, got {cfg.shared_selection!r}")
    if cfg.calibration_tokens < 1:
        raise UpcycleError(f"--calibration-tokens must be at least 1, got {cfg.calibration_tokens}")
    if not (cfg.expert_noise >= 0 and math.isfinite(cfg.expert_noise)):
        raise UpcycleError(f"--expert-noise must be >= 0, got {cfg.expert_noise}")
    if not 0 <= cfg.reinit_ratio <= 1:
        raise UpcycleError(f"--reinit-ratio must be between 0 and 1, got {cfg.reinit_ratio}")
    if not (math.isfinite(cfg.router_std) and cfg.router_std > 0):
        raise UpcycleError(f"--router-std must be > 0, got {cfg.router_std}")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise UpcycleError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.max_shard_size < 1:
        raise UpcycleError("max_shard_size must be positive")


def _check_out(cfg: ConvertConfig) -> tuple[str, str]:
    out = os.path.abspath(cfg.out)
    parent = os.path.dirname(out)
    if os.path.exists(out) and not cfg.overwrite:
        raise UpcycleError(f"output {cfg.out} already exists (pass --overwrite to replace it)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UpcycleError(f"output {cfg.out} exists and is not a directory")
    base = _existing_ancestor(parent)
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        raise UpcycleError(f"cannot write output {cfg.out}: {base} is not a writable directory")
    return out, parent


def _existing_ancestor(path: str) -> str:
    """``path`` or its nearest existing ancestor: what decides writability and free space."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


class _Plan:
    """Which output tensors come from which source tensors."""

    def __init__(self, src: Source, spec: ArchSpec, layer_ids: list[int], cfg: ConvertConfig, dtype: torch.dtype):
        self.spec, self.cfg, self.dtype = spec, cfg, dtype
        self.moe_layers = set(layer_ids)
        form = spec.form
        names = src.tensor_names()
        present = set(names)
        self.outputs: list[tuple[TensorSpec, tuple]] = []  # (output spec, recipe)
        self.mlp_shapes: dict = {}
        self.widths: Widths | None = None
        self.shared_idx: dict[int, torch.Tensor] = {}
        """Per layer, the shared expert's neurons (filled by ``convert`` before anything is written)."""
        done_layers: set[int] = set()
        for name in names:
            layer = self._moe_layer_of(name)
            if layer is None:
                shape, src_dtype = src.tensor_info(name)
                out_dtype = dtype if src_dtype.is_floating_point else src_dtype
                self.outputs.append((TensorSpec(name, tuple(shape), out_dtype), ("copy", name)))
                continue
            if layer in done_layers:
                continue
            done_layers.add(layer)
            mp = spec.mlp_prefix(layer)
            missing = [n for n in source_names(form, mp) if n not in present]
            if missing:
                raise UpcycleError(f"source has no tensor {missing[0]} (expected for a {spec.family} MLP)")
            D, F = mlp_dims(src, form, mp)
            if self.widths is None:
                self.widths = plan_widths(F, cfg.moe.granularity, cfg.shared_fraction, cfg.shared_neurons)
            elif F != self.widths.dense:
                raise UpcycleError(f"layer {layer}'s MLP has {F} neurons, the first upcycled layer's "
                                   f"{self.widths.dense}: upcycled layers must share one MLP width")
            self.mlp_shapes[layer] = (D, F)
            self._add_layer(mp, layer, D, dtype)
        if done_layers != self.moe_layers:
            missing = sorted(self.moe_layers - done_layers)
            raise UpcycleError(f"source has no MLP tensors for layer {missing[0]}")

    def _add_layer(self, mp: str, layer: int, D: int, dtype: torch.dtype) -> None:
        """The output tensors of MoE layer ``layer``: router, stacked experts, the shared expert's projections."""
        form, E, w = self.spec.form, self.cfg.moe.num_experts, self.widths
        up_name = "gate_up_proj" if form.gated else "up_proj"
        up_rows = 2 * w.expert if form.gated else w.expert
        out = [("router.weight", (E, D), "router", None),
               (f"experts.{up_name}", (E, up_rows, D), "experts", "up"),
               (f"experts.{up_name}_bias", (E, up_rows), "experts", "up_bias"),
               ("experts.down_proj", (E, D, w.expert), "experts", "down"),
               ("experts.down_proj_bias", (E, D), "experts", "down_bias")]
        if w.shared:
            # Qwen2-MoE's names and layout (nn.Linear [out, in]): the export maps them one to one.
            parts = (["gate"] if form.gated else []) + ["up"]
            out += [(f"shared_expert.{p}_proj.weight", (w.shared, D), "shared", p) for p in parts]
            out += [(f"shared_expert.{p}_proj.bias", (w.shared,), "shared", f"{p}_bias") for p in parts]
            out += [("shared_expert.down_proj.weight", (D, w.shared), "shared", "down"),
                    ("shared_expert.down_proj.bias", (D,), "shared", "down_bias")]
        for name, shape, kind, part in out:
            if name.endswith("bias") and not form.bias:
                continue
            self.outputs.append((TensorSpec(f"{mp}.{name}", shape, dtype), (kind, (layer, part))))

    def _moe_layer_of(self, name: str) -> int | None:
        prefix = self.spec.layers_prefix + "."
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        idx, _, tail = rest.partition(".")
        if not idx.isdigit() or int(idx) not in self.moe_layers:
            return None
        return int(idx) if tail.startswith(self.spec.mlp_name + ".") else None


def _produce(src: Source, plan: _Plan, out_spec: TensorSpec, recipe: tuple, cache: dict, emit) -> None:
    """Emit the bytes of one output tensor through ``emit(name, part)``."""
    kind, arg = recipe
    spec, cfg, dtype = plan.spec, plan.cfg, plan.dtype
    if kind == "copy":
        emit(out_spec.name, src.get_tensor(arg).to(out_spec.dtype))
        return
    layer, part = arg
    if kind == "router":
        moe = cfg.moe
        rows = router_rows(moe.num_copies, moe.granularity, out_spec.shape[1], cfg.router_std,
                           generator(cfg.seed, layer, -1, 0))
        emit(out_spec.name, rows.to(dtype))
        return
    if layer not in cache:
        cache.clear()  # one layer's dense MLP in memory at a time
        mp = spec.mlp_prefix(layer)
        biases = dense_biases(src, spec.form, mp) if spec.form.bias else (None, None)
        shared_idx = plan.shared_idx.get(layer, torch.zeros(0, dtype=torch.long))
        cache[layer] = ExpertMaker(cfg, layer, plan.widths, shared_idx, *dense_weights(src, spec.form, mp), *biases,
                                   gated=spec.form.gated)
    maker = cache[layer]
    if kind == "shared":
        emit(out_spec.name, maker.shared(part, dtype))
        return
    for j in range(cfg.moe.num_experts):
        emit(out_spec.name, maker.expert(j, part, dtype))


def _upcycle_section(src: Source, spec: ArchSpec, cfg: ConvertConfig, layer_ids, plan: _Plan,
                     shared: dict | None) -> dict:
    D, F = next(iter(plan.mlp_shapes.values()))
    w = plan.widths
    init = "copy"
    if cfg.reinit_ratio > 0:
        init = "drop-upcycling"
    elif cfg.expert_noise > 0:
        init = "noise"
    return {
        "version": __version__,
        "base_model_type": spec.family,
        "layer_ids": list(layer_ids),
        "moe": asdict(cfg.moe),
        "layers": spec.layers_prefix,
        "mlp_name": spec.mlp_name,
        # ffn_size: a routed expert's width (a segment's, padding included); dense_ffn_size: the source MLP's;
        # shared_ffn_size: the always-on shared expert's (0: none). Checkpoints without the last two have neither.
        "mlp": {"hidden_size": D, "ffn_size": w.expert, "gated": spec.form.gated, "activation": spec.form.activation,
                "bias": spec.form.bias, "dense_ffn_size": F, "shared_ffn_size": w.shared, "padding": w.padding},
        "init": {"method": init, "expert_noise": cfg.expert_noise, "reinit_ratio": cfg.reinit_ratio,
                 "router_std": cfg.router_std, "seed": cfg.seed, "permute_copies": cfg.permute_copies,
                 # The routed down projections' factor on top of G (softmax-then-top-K; 1.0: none).
                 "weight_scaling": cfg.moe.num_experts / cfg.moe.top_k if cfg.weight_scaling else 1.0},
        **({"shared": shared} if shared else {}),
        # Absolute (an alias or hub id as given): whatever reopens it checks the fingerprint (models/recorded.py).
        "source": {"model": record_source(src.spec), "kind": src.kind, "fingerprint": src.fingerprint},
    }


def _write_config(src: Source, tmp: str, section: dict, dtype: torch.dtype) -> None:
    config_cls, model_cls = register(section["base_model_type"])
    d = src.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "upcycle"):
        d.pop(key, None)
    config = config_cls(**d)
    config.upcycle = section
    config.architectures = [model_cls.__name__]
    config.dtype = dtype
    config.save_pretrained(tmp)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert(cfg: ConvertConfig) -> ConvertResult:
    """Upcycle ``cfg.model`` into an MoE checkpoint at ``cfg.out``. See ``ConvertConfig``."""
    _validate(cfg)
    target = os.path.abspath(cfg.out)
    if os.path.isdir(os.path.dirname(target)):  # before the checks: a killed run may have moved `out` aside
        remove_stale(os.path.dirname(target), os.path.basename(target))
    out, parent = _check_out(cfg)
    t0 = time.perf_counter()
    with open_source(cfg.model) as src:
        if isinstance(getattr(src.config, "upcycle", None), dict):
            raise UpcycleError(f"{cfg.model} is already upcycled; convert its dense source "
                               f"({src.config.upcycle.get('source', {}).get('model', 'recorded in its config.json')})")
        if os.path.exists(out) and (os.path.samefile(out, src.path) or str(src.path).startswith(out + os.sep)):
            raise UpcycleError(f"--out {cfg.out} is the source model itself; choose another output directory")
        model = skeleton(src.config)
        spec = arch_spec(src.config, model)
        layer_ids = resolve_layer_ids(cfg, spec.num_layers)
        for layer in layer_ids:
            check_layer(spec, model, layer)
        # The reading of the MLP that reproduces it on real weights, before anything is written.
        spec = dataclasses.replace(spec, form=resolve_form(src, spec, layer_ids[0], model))
        del model
        dtype = DTYPES[cfg.dtype] if cfg.dtype else src.default_dtype
        plan = _Plan(src, spec, layer_ids, cfg, dtype)
        shared = None
        if plan.widths.shared:
            plan.shared_idx, shared = choose_shared(src, spec, layer_ids, plan.widths, cfg)
        for message in routing_scheme(cfg.moe).convert_warnings():
            warnings.warn(message, stacklevel=2)
        if cfg.weight_scaling:
            warnings.warn(WEIGHT_SCALING_WARNING.format(scale=cfg.moe.num_experts / cfg.moe.top_k), stacklevel=2)
        shards = plan_shards([o for o, _ in plan.outputs], cfg.max_shard_size)
        total = sum(o.nbytes for o, _ in plan.outputs)
        free = shutil.disk_usage(_existing_ancestor(parent)).free
        if free < total * 1.02 + 64 * 2**20:
            raise UpcycleError(
                f"not enough free disk space in {parent}: need {total / 1e9:.2f} GB, have {free / 1e9:.2f} GB"
            )
        section = _upcycle_section(src, spec, cfg, layer_ids, plan, shared)
        recipes = dict((o.name, r) for o, r in plan.outputs)
        old_handler = signal.getsignal(signal.SIGTERM)
        # SIGTERM cleans up like Ctrl-C; kill -9 cannot, which is why config.json comes last.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
                names = shard_file_names(len(shards))
                cache: dict = {}
                with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not cfg.progress) as bar:
                    for specs, fname in zip(shards, names):
                        writer = ShardWriter(os.path.join(tmp, fname), specs)
                        try:
                            for o in specs:
                                _produce(src, plan, o, recipes[o.name], cache,
                                         lambda n, part: bar.update(writer.write(n, part)))
                        except BaseException:
                            writer.abort()
                            raise
                        writer.close()
                write_index(tmp, shards, names)
                src.save_tokenizer(tmp)
                src.generation_config().save_pretrained(tmp)
                _write_config(src, tmp, section, dtype)
        finally:
            signal.signal(signal.SIGTERM, old_handler)
    return ConvertResult(out=cfg.out, layer_ids=layer_ids, num_experts=cfg.moe.num_experts, bytes_written=total,
                         seconds=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb(), widths=plan.widths,
                         shared_score_share=(shared or {}).get("score_share"))
