"""Experts-layer benchmark: each experts backend against a dense matmul of the same FLOPs.

    python benchmarks/moe_layer.py [--tokens 16384] [--shapes smollm2,smollm2-ec,llama3-8b,fine-grained]
                                   [--backends triton,triton-nf4,grouped_mm,loop] [--reps 20]

Times one ``StackedExperts`` layer (the whole forward of each backend: grouped_mm includes
its permute and unpermute, triton its sort), forward (under ``torch.no_grad``, as in
inference) and forward+backward (gradients of x, combine weights and all expert weights),
routing excluded (assignments are computed once). On CUDA it also reports the peak memory
allocated during one forward+backward, above what was allocated before it (weights, inputs). FLOPs follow DESIGN.md 5: forward 6*A*D*F and
forward+backward 18*A*D*F for A = T*K assignments (expert choice: K = capacity C). The
dense reference is ``torch.matmul`` of [A, D] x [D, F] in the same dtype, measured in the
same run; "x dense" is a backend's TFLOP/s over the dense one's.

A backend name ending in ``-nf4`` runs the same experts quantised to NF4 (``NF4StackedExperts``,
QLoRA's frozen base, per-expert codes, compute in the benchmark's dtype) on that backend: on
``triton`` the kernels decode the codes in registers; forward+backward differentiates x and the
combine weights only (the weights are frozen), so its FLOPs are counted as 12*A*D*F (two GEMMs
per projection, none for weight gradients).

On CUDA: bf16, ``--tokens`` tokens, all backends, timed with ``triton.testing.do_bench``.
On a CPU-only machine: float32, the CPU backends only (loop, grouped_mm; triton's CPU
interpreter is no benchmark) at reduced sizes (T=512, D and F divided by 4), median of
``--reps`` ``time.perf_counter`` runs after warmup; the table header says so.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import time

import torch

from upcycle.moe import StackedExperts, route_expert_choice, route_topk

# name: (D, F, E, routing, K or capacity C)
SHAPES = {
    "smollm2": (576, 1536, 32, "topk", 2),
    "smollm2-ec": (576, 1536, 32, "expert-choice", 2),
    "llama3-8b": (4096, 14336, 8, "topk", 2),
    "fine-grained": (2048, 768, 128, "topk", 8),
}
CPU_TOKENS, CPU_DIVISOR = 512, 4


def _peak_mib(fn, cuda: bool) -> float | None:
    """MiB allocated at the peak of one call of ``fn``, above what was allocated before it (CUDA only)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _time_ms(fn, reps: int, cuda: bool) -> float:
    fn()  # first call: triton autotuning, allocator warmup
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, 10 * reps), return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _routing(T: int, E: int, routing: str, k: int, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(T, E, generator=g).to(device)
    if routing == "topk":
        r = route_topk(logits, k)
        return r.token_idx_A, r.expert_idx_A, r.weight_A, False
    # One routing group over all T tokens (the EC paper's grouping): each expert takes C*T/E.
    r = route_expert_choice(logits.view(1, T, E), float(k), group="sequence")
    return r.token_idx_A, r.expert_idx_A, r.weight_A, True


def bench_shape(name: str, T: int, D: int, Fn: int, E: int, routing: str, k: int, backends, dtype, device,
                reps: int) -> list[tuple]:
    cuda = device.type == "cuda"
    tok, exp, w, expert_major = _routing(T, E, routing, k, device)
    A = tok.numel()
    flops_fwd = 6 * A * D * Fn
    rows = []
    a = torch.randn(A, D, dtype=dtype, device=device)
    b = torch.randn(D, Fn, dtype=dtype, device=device)
    mm_ms = _time_ms(lambda: torch.matmul(a, b), reps, cuda)
    dense_tflops = 2 * A * D * Fn / mm_ms / 1e9
    rows.append((name, f"dense matmul ({str(dtype).removeprefix('torch.')})", 3 * mm_ms, dense_tflops, 9 * mm_ms,
                 dense_tflops, 1.0, 1.0, _peak_mib(functools.partial(torch.matmul, a, b), cuda)))
    del a, b
    torch.manual_seed(0)
    ex = StackedExperts(E, D, Fn, gated=True, activation="silu", dtype=dtype, device=device)
    x = torch.randn(T, D, dtype=dtype, device=device)
    grad_out = torch.randn(T, D, dtype=dtype, device=device)
    nf4 = None
    for backend in backends:
        module = ex
        if backend.endswith("-nf4"):
            from upcycle.adapters import NF4StackedExperts

            if nf4 is None:
                nf4 = NF4StackedExperts.from_experts(ex, shared_base=False, compute_dtype=dtype)
            module = nf4
        module.backend = backend.removesuffix("-nf4")
        kw = dict(expert_major=True) if expert_major and module.backend == "triton" else {}

        def fwd():
            with torch.no_grad():
                return module(x, tok, exp, w, **kw)

        def fwd_bwd():
            module.zero_grad(set_to_none=True)
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            module(xg, tok, exp, wg, **kw).backward(grad_out)

        f_ms = _time_ms(fwd, reps, cuda)
        fb_ms = _time_ms(fwd_bwd, reps, cuda)
        fb_flops = (2 if module is nf4 else 3) * flops_fwd  # frozen NF4 weights: no weight-gradient GEMMs
        f_tf, fb_tf = flops_fwd / f_ms / 1e9, fb_flops / fb_ms / 1e9
        module.zero_grad(set_to_none=True)
        rows.append((name, backend, f_ms, f_tf, fb_ms, fb_tf, f_tf / dense_tflops, fb_tf / dense_tflops,
                     _peak_mib(fwd_bwd, cuda)))
    ex.zero_grad(set_to_none=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch on CUDA (CPU: fixed 512)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--backends", default=None, help="default: triton,grouped_mm,loop on CUDA; grouped_mm,loop on CPU "
                                                     "(a name ending in -nf4: the same experts in NF4 on that backend)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = (args.backends or ("triton,grouped_mm,loop" if cuda else "grouped_mm,loop")).split(",")
    T = args.tokens if cuda else CPU_TOKENS
    div = 1 if cuda else CPU_DIVISOR
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{torch.get_num_threads()} threads)"
    print(f"# experts layer, {dev_name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, "
          f"{datetime.date.today()}")
    print(f"# T={T} tokens" + ("" if cuda else f"; CPU run: reduced sizes (T={CPU_TOKENS}, D and F divided by "
                                               f"{CPU_DIVISOR}), CPU backends only, fp32 dense reference"))
    print("| shape | D | F | E | K/C | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| fwd x dense | fwd+bwd x dense |" + (" fwd+bwd peak MiB |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for name in args.shapes.split(","):
        D, Fn, E, routing, k = SHAPES[name]
        D, Fn = D // div, Fn // div
        for row in bench_shape(name, T, D, Fn, E, routing, k, backends, dtype, device, args.reps):
            shape, backend, f_ms, f_tf, fb_ms, fb_tf, f_x, fb_x, peak = row
            print(f"| {shape} | {D} | {Fn} | {E} | {k} | {backend} | {f_ms:.2f} | {f_tf:.3f} | {fb_ms:.2f} "
                  f"| {fb_tf:.3f} | {f_x:.2f} | {fb_x:.2f} |" + (f" {peak:.0f} |" if cuda else ""), flush=True)


if __name__ == "__main__":
    main()
