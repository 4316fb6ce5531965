"""One dense MLP read out of a source in the experts' layout, and proof that the layout is right.

    form = resolve_form(src, spec, layer, model)      # the reading that reproduces the source MLP
    w_in_MD, w_down_DF = dense_weights(src, form, spec.mlp_prefix(layer))

Every form becomes the stored expert layout: ``w_in`` [M, D] (gated: rows :F the gate, F: the
up projection; M = 2F) and ``w_down`` [D, F], biases [M] and [D]. A fused weight whose gate
is the second half is swapped; Conv1D weights ([in, out]) are transposed, once, here.

``resolve_form`` runs the source's own MLP module (built from the model's meta skeleton, filled
with the real weights of one layer, float32) and each candidate reading of ``spec.form`` on
the same random input, and keeps the closest one, if it matches: an MLP that computes
anything else (an extra scale, a norm inside, another activation) is refused before anything
is written.

Shape legend: D hidden size, F FFN size, M first-projection rows (2F gated, F otherwise).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from upcycle.arch import ArchSpec, MLPForm, mlp_form, refuse

_VERIFY_TOKENS = 16


def source_names(form: MLPForm, prefix: str) -> list[str]:
    """The source tensors one MLP of this form is made of."""
    parts = ([form.gate] if form.kind == "gated" else []) + [form.up, form.down]
    return [f"{prefix}.{p}.weight" for p in parts] + ([f"{prefix}.{p}.bias" for p in parts] if form.bias else [])


def mlp_dims(src, form: MLPForm, prefix: str) -> tuple[int, int]:
    """(D, F) from the down projection's shape, read from metadata only."""
    shape = src.tensor_info(f"{prefix}.{form.down}.weight")[0]
    D, Fn = (shape[1], shape[0]) if form.transposed else shape
    return D, Fn


def _weight(src, form: MLPForm, prefix: str, part: str) -> Tensor:
    w = src.get_tensor(f"{prefix}.{part}.weight")
    return w.t().contiguous() if form.transposed else w


def _gate_up(form: MLPForm, src, prefix: str, what) -> Tensor:
    """The first projection's rows (or bias) in the experts' order: gate, then up."""
    if form.kind == "gated":
        return torch.cat([what(form.gate), what(form.up)])
    t = what(form.up)
    if form.kind == "fused" and not form.gate_first:
        first, second = t.chunk(2)
        t = torch.cat([second, first])
    return t


def dense_weights(src, form: MLPForm, prefix: str) -> tuple[Tensor, Tensor]:
    """(w_in [M, D], w_down [D, F]) of the MLP at ``prefix``, in the source's dtype."""
    return _gate_up(form, src, prefix, lambda p: _weight(src, form, prefix, p)), _weight(src, form, prefix, form.down)


def dense_biases(src, form: MLPForm, prefix: str) -> tuple[Tensor, Tensor]:
    """(b_in [M], b_down [D]) of the MLP at ``prefix`` (``form.bias`` only)."""
    bias = lambda p: src.get_tensor(f"{prefix}.{p}.bias")  # noqa: E731
    return _gate_up(form, src, prefix, bias), bias(form.down)


def run_dense(form: MLPForm, w_in_MD: Tensor, w_down_DF: Tensor, b_in_M: Tensor | None, b_down_D: Tensor | None,
              x_TD: Tensor) -> Tensor:
    """What one expert computes, written plainly: the reference for ``resolve_form``."""
    h_TM = F.linear(x_TD, w_in_MD, b_in_M)
    act = ACT2FN[form.activation]
    if form.gated:
        gate_TF, up_TF = h_TM.chunk(2, dim=-1)
        h_TF = act(gate_TF) * up_TF
    else:
        h_TF = act(h_TM)
    return F.linear(h_TF, w_down_DF, b_down_D)


@torch.no_grad()
def resolve_form(src, spec: ArchSpec, layer: int, model: nn.Module) -> MLPForm:
    """The reading of ``spec.form`` that reproduces the source's MLP at ``layer`` (see the module docstring).

    ``model``: the meta skeleton of the source model (its MLP module is copied, filled, and run).
    """
    prefix = spec.mlp_prefix(layer)
    mlp = copy.deepcopy(model.get_submodule(prefix)).to_empty(device="cpu").float().eval()
    state, present = {}, set(src.tensor_names())
    for key in mlp.state_dict():
        name = f"{prefix}.{key}"
        if name not in present:
            raise refuse(spec.family, f"its MLP's {key} is not among the checkpoint's tensors")
        state[key] = src.get_tensor(name).float()
    mlp.load_state_dict(state)
    D, _ = mlp_dims(src, spec.form, prefix)
    x_TD = torch.randn(_VERIFY_TOKENS, D, generator=torch.Generator().manual_seed(0))
    try:
        want = mlp(x_TD).float()
    except Exception as e:  # an MLP whose forward needs more than the hidden states
        raise refuse(spec.family, f"its MLP cannot run on hidden states alone ({type(e).__name__}: {e})") from None
    tol = 1e-4 * max(1.0, want.abs().max().item())
    best, best_err = None, float("inf")
    for form in spec.form.candidates():
        w_in, w_down = (w.float() for w in dense_weights(src, form, prefix))
        b_in, b_down = (b.float() for b in dense_biases(src, form, prefix)) if form.bias else (None, None)
        err = (run_dense(form, w_in, w_down, b_in, b_down, x_TD) - want).abs().max().item()
        if err < best_err:
            best, best_err = form, err
    if best is None or best_err > tol:
        raise refuse(spec.family, f"its MLP ({type(mlp).__name__}) does not compute a {spec.form.kind} MLP with any "
                                  f"of the activations {', '.join(spec.form.activations)} (closest: max |difference| "
                                  f"{best_err:.3g} on random input)")
    return best


def check_layer(spec: ArchSpec, model: nn.Module, layer: int) -> None:
    """UpcycleError unless layer ``layer``'s MLP has the structure of the spec's (read off layer 0):
    a model whose later layers are a mixture of experts already, say, is refused here."""
    form = mlp_form(model.get_submodule(spec.mlp_prefix(layer)), model.config)
    if isinstance(form, str):
        raise refuse(spec.family, f"layer {layer}: {form}")
    if _structure(form) != _structure(spec.form):
        raise refuse(spec.family, f"the MLP of layer {layer} differs from layer 0's")


def _structure(form: MLPForm) -> tuple:
    return form.kind, frozenset(n for n in (form.gate, form.up, form.down) if n), form.transposed, form.bias
