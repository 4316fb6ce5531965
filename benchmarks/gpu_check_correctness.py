"""Stage 3 of ``gpu_check.py``: the triton experts against a float32 loop, NF4 experts (decoded in the
kernels) against the same kernels on dequantised weights, the NF4 dequant kernel against torch.

    python benchmarks/gpu_check.py --stages correctness

Inputs are random, drawn afresh per case; the reference gets the same (rounded) inputs in
float32, so a comparison measures the kernels alone. Tolerances: tests/tolerances.py.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: hidden D, expert FFN F, experts E, routing, K (top-K) or C (expert choice), gated, biases, activation
SHAPES = {
    "smollm2": (576, 1536, 32, "topk", 2, True, False, "silu"),
    "llama3-8b": (4096, 14336, 8, "topk", 2, True, False, "silu"),
    "fine-grained": (2048, 768, 128, "topk", 8, True, False, "silu"),
    "smollm2-ec": (576, 1536, 32, "expert-choice", 2, True, False, "silu"),
    "non-gated-bias": (1024, 4096, 8, "topk", 2, False, True, "gelu"),
}
SMOKE_SHAPES = {"tiny-topk": (32, 48, 4, "topk", 2, True, False, "silu"),
                "tiny-ec": (32, 48, 4, "expert-choice", 2, True, False, "silu"),
                "tiny-non-gated-bias": (32, 40, 4, "topk", 2, False, True, "gelu")}


def _routing(T: int, E: int, routing: str, k: int, device, gen):
    """(token_idx, expert_idx, weight, expert_major): top-K (renormalised) or expert choice, plain torch."""
    import torch

    probs = torch.randn(T, E, generator=gen).softmax(-1).to(device)
    if routing == "topk":
        w, e = probs.topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return torch.arange(T, device=device).repeat_interleave(k), e.flatten(), w.flatten(), False
    cap = max(1, k * T // E)  # every expert takes C*T/E tokens: expert-major, equal counts
    w, t = probs.t().topk(cap, dim=-1)
    return t.flatten(), torch.arange(E, device=device).repeat_interleave(cap), w.flatten(), True


def reference_experts(x, tok, exp, w, w_in, w_down, b_in, b_down, activation: str, gated: bool):
    """float32 y = sum_a w[a] * expert_e(x[tok[a]]), one expert at a time (the ``loop`` backend's math)."""
    import torch
    from transformers.activations import ACT2FN

    act = ACT2FN[activation]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_in.shape[0]):
        sel = (exp == e).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        h = x[tok[sel]] @ w_in[e].t() + (b_in[e] if b_in is not None else 0)
        if gated:
            g, u = h.chunk(2, dim=-1)
            h = act(g) * u
        else:
            h = act(h)
        out = h @ w_down[e].t() + (b_down[e] if b_down is not None else 0)
        y = y.index_add(0, tok[sel], out * w[sel, None])
    return y


def _compare(got, ref, tol: dict) -> dict:
    """Elementwise |got - ref| <= atol * max(1, max|ref|) + rtol * |ref| (the scale: gradients grow with
    the sums behind them, as in tests/test_kernels.py), plus the normwise relative error."""
    import torch

    got, ref = got.float(), ref.float()
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs()
    ok = bool(torch.isfinite(got).all()) and bool((err <= tol["atol"] * scale + tol["rtol"] * ref.abs()).all())
    return {"ok": ok, "max_abs": err.max().item(), "rel_norm": (err.norm() / ref.norm().clamp_min(1e-30)).item()}


def _case(name: str, shape: tuple, dtype, T: int, device, tolerances) -> dict:
    import torch
    import upcycle_kernels

    D, Fn, E, routing, k, gated, bias, act = shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    M = 2 * Fn if gated else Fn
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device)  # noqa: E731
    leaves = {"x": rnd(T, D), "w_in": rnd(E, M, D, std=D ** -0.5), "w_down": rnd(E, D, Fn, std=Fn ** -0.5)}
    if bias:
        leaves.update(b_in=rnd(E, M, std=0.1), b_down=rnd(E, D, std=0.1))
    tok, exp, w, expert_major = _routing(T, E, routing, k, device, gen)
    leaves["w"] = w
    grad_out = rnd(T, D).to(dtype)
    results = {}
    for which in ("triton", "reference"):
        # The reference gets the same (rounded) inputs in float32: the comparison measures the kernels only.
        cast = (lambda t: t.to(dtype)) if which == "triton" else (lambda t: t.to(dtype).float())  # noqa: E731
        p = {n: (cast(t) if n != "w" else t).detach().requires_grad_() for n, t in leaves.items()}
        args = (p["x"], tok, exp, p["w"], p["w_in"], p["w_down"], p.get("b_in"), p.get("b_down"))
        if which == "triton":
            y = upcycle_kernels.moe_experts(*args, activation=act, gated=gated, expert_major=expert_major)
        else:
            y = reference_experts(*args, act, gated)
        y.backward(grad_out.to(y.dtype))
        results[which] = {"y": y.detach(), **{f"d{n}": t.grad for n, t in p.items()}}
        del p, y
    tol = tolerances[dtype]
    checks = {n: _compare(results["triton"][n], results["reference"][n], tol) for n in results["reference"]}
    return {"case": name, "dtype": str(dtype).removeprefix("torch."), "T": T, "ok": all(c["ok"] for c in checks.values()),
            "worst_rel_norm": max(c["rel_norm"] for c in checks.values()),
            "failed": ", ".join(n for n, c in checks.items() if not c["ok"]), "checks": checks}


def _nf4_case(numel: tuple, dtype, double: bool, device) -> dict:
    import torch

    import upcycle

    w = torch.randn(*numel, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    q = upcycle.quantize_nf4(w, double_quant=double)
    a, b = upcycle.dequantize_nf4(q, backend="triton"), upcycle.dequantize_nf4(q, backend="torch")
    same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return {"case": f"nf4 dequant {tuple(numel)}", "dtype": str(dtype).removeprefix("torch."),
            "double_quant": double, "ok": bool(same), "bit_exact": bool(same)}


def _nf4_experts_case(name: str, shape: tuple, dtype, T: int, device, tolerances) -> dict:
    """NF4 experts on the triton backend (tiles decoded in the kernels) against the same kernels on the
    dequantised weights: forward, dx and d(combine weights). Bit for bit under the CPU interpreter
    (a test); on a GPU the NF4 launches compile without fp fusion, so the epilogues may round apart."""
    import torch

    from upcycle.adapters import NF4StackedExperts
    from upcycle.moe import StackedExperts

    D, Fn, E, routing, k, gated, bias, act = shape
    gen = torch.Generator().manual_seed(zlib.crc32(("nf4 " + name).encode()))
    ex = StackedExperts(E, D, Fn, gated=gated, activation=act, bias=bias, device=device)
    q = NF4StackedExperts.from_experts(ex, shared_base=False, compute_dtype=dtype)
    w = q.expert_weights()
    ref = StackedExperts(E, D, Fn, gated=gated, activation=act, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        ref.w_in_EMD.copy_(w.w_in_EMD)
        ref.down_proj.copy_(w.w_down_EDF)
        if bias:
            ref.b_in_EM.copy_(w.b_in_EM)
            ref.down_proj_bias.copy_(w.b_down_ED)
    del w
    ref.requires_grad_(False)
    q.backend = ref.backend = "triton"
    tok, exp, wts, expert_major = _routing(T, E, routing, k, device, gen)
    x0 = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
    grad_out = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
    results = []
    for m in (q, ref):
        x, wa = x0.clone().requires_grad_(), wts.clone().requires_grad_()
        y = m(x, tok, exp, wa, expert_major=expert_major)
        y.backward(grad_out)
        results.append({"y": y.detach(), "dx": x.grad, "dw": wa.grad})
    tol = tolerances[dtype]
    checks = {n: _compare(results[0][n], results[1][n], tol) for n in results[1]}
    exact = all(torch.equal(results[0][n], results[1][n]) for n in results[1])
    return {"case": f"nf4 experts {name}", "dtype": str(dtype).removeprefix("torch."), "T": T,
            "ok": all(c["ok"] for c in checks.values()), "bit_exact": exact,
            "worst_rel_norm": max(c["rel_norm"] for c in checks.values()),
            "failed": ", ".join(n for n, c in checks.items() if not c["ok"]), "checks": checks}


def _tolerances() -> dict:
    """The one tolerance table (tests/tolerances.py; tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("upcycle_test_tolerances", ROOT / "tests" / "tolerances.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TOLERANCES


def stage_correctness(st, ctx: dict) -> None:
    """``st``: the ``gpu_check.Stage`` to fill; ``ctx``: cuda, smoke, work."""
    import torch

    tolerances = _tolerances()
    device = "cuda" if ctx["cuda"] else "cpu"
    shapes, T = (SMOKE_SHAPES, 24) if ctx["smoke"] else (SHAPES, 4096)
    for dtype in (torch.bfloat16, torch.float32):
        for name, shape in shapes.items():
            if st.out_of_time(f"{name} {dtype}"):
                break
            try:
                st.rows.append(_case(name, shape, dtype, T, device, tolerances))
            except Exception as e:
                st.rows.append({"case": name, "dtype": str(dtype).removeprefix("torch."), "ok": False,
                                "error": _one_line(e)})
            if device == "cuda":
                torch.cuda.empty_cache()
    nf4_shapes = ["tiny-topk", "tiny-ec"] if ctx["smoke"] else ["smollm2", "llama3-8b", "smollm2-ec"]
    for name in nf4_shapes:
        if st.out_of_time(f"nf4 experts {name}"):
            break
        try:
            st.rows.append(_nf4_experts_case(name, shapes[name], torch.bfloat16, T, device, tolerances))
        except Exception as e:
            st.rows.append({"case": f"nf4 experts {name}", "dtype": "bfloat16", "ok": False, "error": _one_line(e)})
        if device == "cuda":
            torch.cuda.empty_cache()
    sizes = [(7, 130)] if ctx["smoke"] else [(4096, 14336), (1000, 999)]
    for numel in sizes:
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            for double in (True, False):
                if st.out_of_time(f"nf4 {numel} {dtype}"):
                    break
                try:
                    st.rows.append(_nf4_case(numel, dtype, double, device))
                except Exception as e:
                    st.rows.append({"case": f"nf4 dequant {numel}", "dtype": str(dtype).removeprefix("torch."),
                                    "double_quant": double, "ok": False, "error": _one_line(e)})
    bad = [r for r in st.rows if not r["ok"]]
    if bad:
        st.status, st.reason = "failed", f"{len(bad)} of {len(st.rows)} cases outside tolerance or failing"


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
