"""What ``aot.py`` compiles: each kernel's specialisations, as its launcher produces them.

    from upcycle_kernels import aot_specs
    for spec in aot_specs.specs("up", "default"): print(spec.label)

A specialisation is what makes triton compile a new binary: the constexprs a launcher passes
(``launch.py``, ``nf4.py``), the dtypes behind its pointers, and which integer arguments are
1 (a unit stride becomes a constant) or multiples of 16 (a divisibility hint, which lets
loads vectorise). The argument values below are built the way the launchers build them,
from tensors of a Llama-3-8B-like layer (every size a multiple of 16), once per kernel of
sizes that are not (``ragged``), and once of a fine-grained upcycle's (``fine``: 256 experts of
64 neurons, each copy of the MLP cut into segments: the smallest width and most experts
``upcycle convert --granularity`` is meant for). ``tests/test_aot.py`` records every launch the CPU
tests make and checks it against this list, so the two cannot drift apart.

Shape legend: see ``grouped_gemm.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import triton

from upcycle_kernels import grouped_gemm as gg
from upcycle_kernels import launch, nf4, tuning
from upcycle_kernels.activations import ACTIVATIONS
from upcycle_kernels.autograd import SUPPORTED_DTYPES

KERNELS = ("up", "scatter", "dh", "weight_grad", "nf4")
ACT_NAMES = {code: name for name, code in reversed(list(ACTIVATIONS.items()))}  # code -> its first name
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.uint8: "u8"}
_DTYPES = {name: dt for dt, name in DTYPE_NAMES.items()}
ALIGNED = dict(T=16384, D=4096, F=14336, E=8)
RAGGED = dict(T=1000, D=1000, F=1000, E=8)
FINE = dict(T=16384, D=4096, F=64, E=256)
SHAPES = {"aligned": ALIGNED, "ragged": RAGGED, "fine": FINE}


_FLAG_WORDS = {"GATED": ("gated", "plain"), "HAS_BIAS": ("bias", "no-bias"), "SAVE_Z": ("save-z", "no-z"),
               "DOUBLE_QUANT": ("double-quant", "single-quant")}


@dataclass(frozen=True)
class Spec:
    """One specialisation of one kernel. ``all_configs``: compile it with every autotune config."""

    kernel: str
    site: str
    dtype: str
    constexprs: tuple
    ptrs: tuple
    ints: tuple
    options: tuple = ()
    all_configs: bool = field(default=True, compare=False)
    tags: tuple = field(default=(), compare=False)

    @property
    def label(self) -> str:
        c = dict(self.constexprs)
        parts = [self.site, self.dtype + ("/tf32" if c.get("PRECISION") == "tf32" else "")]
        for name, (yes, no) in _FLAG_WORDS.items():
            if name in c:
                parts.append(yes if c[name] else no)
        if "ACT" in c:
            parts.append(ACT_NAMES[c["ACT"]])
        if "BLOCK_M" in c:
            parts.append(f"BM={c['BLOCK_M']}")
        if c.get("NF4"):
            parts.append("nf4")
        return " ".join(parts + list(self.tags))


def kernel_and_configs(kernel: str):
    """(the JITFunction, its autotune configs) of a kernel name."""
    if kernel == "nf4":
        # Launched without autotuning: triton's default warps and stages.
        return nf4.nf4_dequant_kernel, [triton.Config({}, num_warps=4, num_stages=3)]
    tuned = {"up": gg.up_gather_kernel, "scatter": gg.scatter_gemm_kernel, "dh": gg.dh_gather_kernel,
             "weight_grad": gg.weight_grad_kernel}[kernel]
    return tuned.fn, tuned.configs


def config_label(cfg) -> str:
    k = cfg.kwargs
    tile = "x".join(str(k[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in k)
    return f"{tile or 'BLOCK=' + str(nf4.DEQUANT_BLOCK)} w{cfg.num_warps} s{cfg.num_stages}"


# ------------------------------------------------------------------ arguments, built as the launchers build them


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _ptr(t: torch.Tensor) -> str:
    return "*" + DTYPE_NAMES[t.dtype]


def _schedule(s):
    """The row-tile schedule and expert offsets every row-tiled launch passes (launch.tile_schedule)."""
    P = 2 * s["T"] // 64 + s["E"]
    return dict(tile_expert_ptr=_meta(P, dtype=torch.int32), tile_row_ptr=_meta(P, dtype=torch.int32),
                offs_ptr=_meta(s["E"] + 1, dtype=torch.int32))


WEIGHTS = ("dense", "nf4")
"""How the up, scatter and dh kernels read their weight: dense, or NF4 codes with fp32 absmax."""


def _weight_args(w, weights: str, numel: int) -> tuple[dict, dict]:
    """(w_ptr and absmax_ptr, their constexprs) as ``launch._weight`` passes them for ``w`` (a meta
    tensor: its strides are the element strides the NF4 view takes too)."""
    if weights == "dense":
        return dict(w_ptr=w, absmax_ptr=w), dict(NF4=False, QBLOCK=1)
    return dict(w_ptr=_meta(numel // 2, dtype=torch.uint8), absmax_ptr=_meta(numel // 64, dtype=torch.float32)), \
        dict(NF4=True, QBLOCK=64)


def _up(dt, gated, has_bias, save_z, s, weights="dense"):
    """launch.up_gather."""
    E, D, Fn = s["E"], s["D"], s["F"]
    M, A = (2 * Fn if gated else Fn), 2 * s["T"]
    x, w, h = _meta(s["T"], D, dtype=dt), _meta(E, M, D, dtype=dt), _meta(A, Fn, dtype=dt)
    b = _meta(E, M, dtype=dt) if has_bias else (w if weights == "dense" else x)
    z = _meta(A if save_z else 0, M, dtype=dt)
    z_strides = z.stride() if save_z else (0, 0)
    wp, c = _weight_args(w, weights, E * M * D)
    ptrs = dict(x_ptr=x, tok_ptr=_meta(A, dtype=torch.int64), b_ptr=b, h_ptr=h, z_ptr=z, **wp, **_schedule(s))
    ints = dict(F=Fn, D=D, stride_xt=x.stride(0), stride_xd=x.stride(1), stride_we=w.stride(0), stride_wm=w.stride(1),
                stride_wd=w.stride(2), stride_be=b.stride(0), stride_bm=b.stride(1), stride_ha=h.stride(0),
                stride_hf=h.stride(1), stride_za=z_strides[0], stride_zm=z_strides[1])
    return ptrs, ints, c


def _scatter(dt, site, has_bias, s, weights="dense"):
    """launch.scatter_gemm as ops.experts_down (site "down": h @ w_down^T) and ops.experts_dx ("dx": dz @ w_in),
    and their NF4 twins (ops.experts_down_nf4, ops.experts_dx_nf4)."""
    E, D, Fn, T = s["E"], s["D"], s["F"], s["T"]
    A, M = 2 * T, 2 * Fn
    if site == "down":
        a, w_EKN = _meta(A, Fn, dtype=dt), _meta(E, D, Fn, dtype=dt).transpose(1, 2)
        scale = _meta(A, dtype=torch.float32)
    else:
        a, w_EKN, scale = _meta(A, M, dtype=dt), _meta(E, M, D, dtype=dt), None
    tok = _meta(A, dtype=torch.int64)
    b = _meta(E, w_EKN.shape[2], dtype=dt) if has_bias else (w_EKN[:, 0] if weights == "dense" else a)
    out = _meta(T, w_EKN.shape[2], dtype=torch.float32)
    wp, c = _weight_args(w_EKN, weights, w_EKN.numel())
    ptrs = dict(a_ptr=a, tok_ptr=tok, scale_ptr=scale if scale is not None else tok, b_ptr=b, out_ptr=out, **wp,
                **_schedule(s))
    ints = dict(N=w_EKN.shape[2], K=w_EKN.shape[1], stride_aa=a.stride(0), stride_ak=a.stride(1),
                stride_we=w_EKN.stride(0), stride_wk=w_EKN.stride(1), stride_wn=w_EKN.stride(2), stride_be=b.stride(0),
                stride_bn=b.stride(1), stride_ot=out.stride(0), stride_on=out.stride(1))
    return ptrs, ints, dict(HAS_SCALE=scale is not None, HAS_BIAS=has_bias, **c)


def _dh(dt, gated, has_bias, s, weights="dense"):
    """launch.dh_gather."""
    E, D, Fn, T = s["E"], s["D"], s["F"], s["T"]
    A, M = 2 * T, (2 * Fn if gated else Fn)
    dy, w = _meta(T, D, dtype=dt), _meta(E, D, Fn, dtype=dt)
    b = _meta(E, D, dtype=dt) if has_bias else (w[:, :, 0] if weights == "dense" else dy)
    z, dz = _meta(A, M, dtype=dt), _meta(A, M, dtype=dt)
    wp, c = _weight_args(w, weights, E * D * Fn)
    ptrs = dict(dy_ptr=dy, tok_ptr=_meta(A, dtype=torch.int64), scale_ptr=_meta(A, dtype=torch.float32),
                b_ptr=b, z_ptr=z, dz_ptr=dz, dscale_ptr=_meta(A, dtype=torch.float32), **wp, **_schedule(s))
    ints = dict(F=Fn, D=D, stride_dyt=dy.stride(0), stride_dyd=dy.stride(1), stride_we=w.stride(0),
                stride_wd=w.stride(1), stride_wf=w.stride(2), stride_be=b.stride(0), stride_bd=b.stride(1),
                stride_za=z.stride(0), stride_zm=z.stride(1), stride_dza=dz.stride(0), stride_dzm=dz.stride(1))
    return ptrs, ints, c


def _weight_grad(dt, site, has_bias, s):
    """launch.weight_grad as autograd's backward calls it: "w_in" = dz^T x[tok], "w_down" = (weight dy[tok])^T h."""
    E, D, Fn, T = s["E"], s["D"], s["F"], s["T"]
    A, M = 2 * T, 2 * Fn
    tok = _meta(A, dtype=torch.int64)
    if site == "w_in":
        l, r, scale, flags = _meta(A, M, dtype=dt), _meta(T, D, dtype=dt), None, dict(L_GATHER=False, R_GATHER=True)
    else:
        l, r = _meta(T, D, dtype=dt), _meta(A, Fn, dtype=dt)
        scale, flags = _meta(A, dtype=torch.float32), dict(L_GATHER=True, R_GATHER=False)
    MW, NW = l.shape[1], r.shape[1]
    dw = _meta(E, MW, NW, dtype=dt)
    db = _meta(E if has_bias else 0, MW, dtype=dt)
    db_strides = db.stride() if has_bias else (0, 0)
    ptrs = dict(l_ptr=l, r_ptr=r, tok_ptr=tok, scale_ptr=scale if scale is not None else tok,
                offs_ptr=_meta(E + 1, dtype=torch.int32), dw_ptr=dw, db_ptr=db)
    ints = dict(MW=MW, NW=NW, stride_lr=l.stride(0), stride_lm=l.stride(1), stride_rr=r.stride(0),
                stride_rn=r.stride(1), stride_dwe=dw.stride(0), stride_dwm=dw.stride(1), stride_dwn=dw.stride(2),
                stride_dbe=db_strides[0], stride_dbm=db_strides[1])
    return ptrs, ints, dict(**flags, L_SCALE=scale is not None, HAS_BIAS=has_bias)


def _nf4(out_dt, double, s):
    """nf4.dequantize_nf4_triton (single quantisation passes absmax for the unused pointers)."""
    n = s["D"] * s["F"]
    absmax = _meta(n // 64, dtype=torch.uint8 if double else torch.float32)
    other = _meta(1, dtype=torch.float32) if double else absmax
    ptrs = dict(packed_ptr=_meta(n // 2, dtype=torch.uint8), absmax_ptr=absmax, absmax2_ptr=other, offset_ptr=other,
                code8_ptr=_meta(256, dtype=torch.float32) if double else absmax,
                out_ptr=_meta(n, dtype=out_dt))
    return ptrs, dict(n=n)


# ------------------------------------------------------------------ the sweep


def _make(kernel, site, dt, precision, constexprs, ptrs, ints, all_configs, tags=(), options=()) -> Spec:
    c = dict(constexprs)
    if precision is not None:
        c.update(PRECISION=precision, WIDEN=False)
    return Spec(kernel, site, DTYPE_NAMES[dt], tuple(sorted(c.items())),
                tuple(sorted((k, _ptr(v)) for k, v in ptrs.items())),
                tuple(sorted(ints.items())), tuple(options), all_configs, tuple(tags))


def _domain(kernel):
    """Every value of every choice that specialises ``kernel``, as its launcher makes them; the first
    value of each is the base specialisation: bf16, gated, no bias, saved z (training), silu, tall
    tiles, sizes that are multiples of 16 -- a Llama-like layer in training."""
    dtypes = [(dt, p) for dt in (torch.bfloat16, torch.float32, torch.float16) if dt in SUPPORTED_DTYPES
              for p in launch.precisions(dt)]
    acts = sorted(set(ACTIVATIONS.values()))
    tiles = sorted(launch.ROW_TILE_HEIGHTS, reverse=True)
    shape = list(SHAPES)
    weights = list(WEIGHTS)
    if kernel == "up":
        return dict(dtype=dtypes, GATED=[True, False], BLOCK_M=tiles, ACT=acts, HAS_BIAS=[False, True],
                    SAVE_Z=[True, False], shape=shape, weights=weights)
    if kernel == "dh":
        return dict(dtype=dtypes, GATED=[True, False], BLOCK_M=tiles, ACT=acts, HAS_BIAS=[False, True], shape=shape,
                    weights=weights)
    if kernel == "scatter":
        return dict(dtype=dtypes, site=["down", "dx"], BLOCK_M=tiles, HAS_BIAS=[False, True], shape=shape,
                    weights=weights)
    if kernel == "weight_grad":
        return dict(dtype=dtypes, site=["w_in", "w_down"], HAS_BIAS=[False, True], shape=shape)
    return dict(dtype=[(dt, None) for dt in (torch.bfloat16, torch.float32, torch.float16)], DOUBLE_QUANT=[True, False])


def _swept(kernel, name, value) -> bool:
    """Whether the default sweep compiles every config with this value (else: the first config only).

    Every config meets the other element width (fp32 tiles take twice the shared memory of
    bf16 ones) and the other call site (the weight's unit stride, or the gather, moves to the
    other operand). BLOCK_M, gating, the epilogue flags and fp16 / tf32 only grow or shrink the
    same tiles, or change what happens to them after the loop: one config each shows that they
    compile (``--full`` compiles all of them with every config)."""
    if name == "dtype":
        return value[0] == torch.float32 and value[1] in ("ieee", None)
    if name == "weights":  # NF4 decoding reshapes registers and shared memory: every config
        return value == "nf4"
    return name in ("site", "DOUBLE_QUANT")


def _build(kernel, choice, all_configs):
    name = choice.get("shape", "aligned")
    shape = SHAPES[name]
    tags = (name,) if name != "aligned" else ()
    dt, prec = choice["dtype"]
    if kernel == "nf4":
        ptrs, ints = _nf4(dt, choice["DOUBLE_QUANT"], shape)
        c = dict(BLOCKSIZE=64, DQ_BLOCKSIZE=256, DOUBLE_QUANT=choice["DOUBLE_QUANT"], BLOCK=nf4.DEQUANT_BLOCK)
        return _make(kernel, "dequant", dt, None, c, ptrs, ints, all_configs, tags, (("enable_fp_fusion", False),))
    weights = choice.get("weights", "dense")
    # NF4 launches compile without fp fusion (launch._weight): the decoded values round as torch's.
    options = () if weights == "dense" else (("enable_fp_fusion", False),)
    if kernel == "up":
        ptrs, ints, q = _up(dt, choice["GATED"], choice["HAS_BIAS"], choice["SAVE_Z"], shape, weights)
        c = {k: choice[k] for k in ("GATED", "ACT", "HAS_BIAS", "SAVE_Z", "BLOCK_M")}
        return _make(kernel, "fwd", dt, prec, dict(c, **q), ptrs, ints, all_configs, tags, options)
    if kernel == "dh":
        ptrs, ints, q = _dh(dt, choice["GATED"], choice["HAS_BIAS"], shape, weights)
        c = {k: choice[k] for k in ("GATED", "ACT", "HAS_BIAS", "BLOCK_M")}
        return _make(kernel, "bwd", dt, prec, dict(c, **q), ptrs, ints, all_configs, tags, options)
    if kernel == "scatter":
        # dx passes neither scale nor bias (ops.experts_dx): only "down" has a bias choice.
        ptrs, ints, c = _scatter(dt, choice["site"], choice["HAS_BIAS"] and choice["site"] == "down", shape, weights)
        return _make(kernel, choice["site"], dt, prec, dict(c, BLOCK_M=choice["BLOCK_M"]), ptrs, ints, all_configs, tags,
                     options)
    ptrs, ints, c = _weight_grad(dt, choice["site"], choice["HAS_BIAS"], shape)
    return _make(kernel, choice["site"], dt, prec, c, ptrs, ints, all_configs, tags)


def specs(kernel: str, mode: str = "default") -> list[Spec]:
    """The specialisations of ``kernel`` to compile.

    ``default``: the base with every config, each swept value (``_swept``) on the base with
    every config, every other value on the base with the first config. ``quick`` (CI): the
    base and the other call site, every config. ``full``: the cross product of every choice,
    every config (hours).
    """
    dom = _domain(kernel)
    names = list(dom)
    base = {n: dom[n][0] for n in names}
    if mode == "full":
        return list(dict.fromkeys(_build(kernel, dict(zip(names, vs)), True)
                                  for vs in itertools.product(*(dom[n] for n in names))))
    if mode not in ("default", "quick"):
        raise ValueError(f"unknown mode {mode!r}: quick, default or full")
    out = {_build(kernel, base, True): None}
    for n in names:
        for v in dom[n][1:]:
            swept = _swept(kernel, n, v)
            if mode == "default" or (swept and n != "dtype"):
                out.setdefault(_build(kernel, dict(base, **{n: v}), swept), None)
    return list(out)


def layer_specs(layer: str) -> list[Spec]:
    """Every launch one training step (and an inference forward) of an experts layer makes, as
    specs to compile with every config. ``layer``: ``DTYPE:gated|plain:bias|no-bias:ACTIVATION[:BLOCK_M]``,
    e.g. ``bf16:gated:no-bias:silu`` (a Llama-like layer; both tile heights) or
    ``fp32:plain:bias:gelu:128``. fp32 takes the ieee precision (torch's default)."""
    parts = layer.split(":")
    names = {v: k for k, v in DTYPE_NAMES.items()}
    if len(parts) not in (4, 5) or parts[0] not in ("bf16", "fp16", "fp32") or parts[1] not in ("gated", "plain") \
            or parts[2] not in ("bias", "no-bias") or parts[3] not in ACTIVATIONS \
            or (len(parts) == 5 and (not parts[4].isdigit() or int(parts[4]) not in launch.ROW_TILE_HEIGHTS)):
        raise ValueError(f"--layer {layer!r}: expected DTYPE:gated|plain:bias|no-bias:ACTIVATION[:BLOCK_M] with DTYPE "
                         f"bf16, fp16 or fp32, an activation of {sorted(ACTIVATIONS)} and BLOCK_M in "
                         f"{launch.ROW_TILE_HEIGHTS}")
    layer_choice = dict(dtype=(names[parts[0]], "ieee"), GATED=parts[1] == "gated", HAS_BIAS=parts[2] == "bias",
                        ACT=ACTIVATIONS[parts[3]], shape="aligned")
    heights = [int(parts[4])] if len(parts) == 5 else list(launch.ROW_TILE_HEIGHTS)
    out = []
    for bm in heights:
        c = dict(layer_choice, BLOCK_M=bm)
        out += [_build("up", dict(c, SAVE_Z=z), True) for z in (True, False)]
        out += [_build("scatter", dict(c, site=site), True) for site in ("down", "dx")]
        out.append(_build("dh", c, True))
    out += [_build("weight_grad", dict(layer_choice, site=site), True) for site in ("w_in", "w_down")]
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------ what triton.compile takes


def signature(fn, spec: Spec, cfg) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, exactly as the JIT specialises a launch:
    an int equal to 1 becomes a constant; every other int and every pointer gets an attribute
    list, with the divisibility hint when divisible by 16 (meta tensors sit at address 0:
    aligned, as fresh allocations are). Same source, same cache key: a kernel compiled here is
    one the JIT finds in triton's cache (tests/test_aot.py checks it)."""
    from triton.backends.compiler import BaseBackend

    constexprs = dict(spec.constexprs)
    constexprs.update(cfg.kwargs)
    ptrs, ints = dict(spec.ptrs), dict(spec.ints)
    every = _jit_lists_every_parameter()
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name], hint = ptrs[name], "D"
        elif name in constexprs or ints.get(name) == 1:
            sig[name] = "constexpr"
            constexprs.setdefault(name, 1)
            value = constexprs[name]
            hint = "" if every else value if isinstance(value, str) else None
        elif name in ints:
            sig[name] = "i32" if -2**31 <= ints[name] < 2**31 else "i64"
            hint = "D" if ints[name] % 16 == 0 else ""
        else:
            raise ValueError(f"{spec.kernel}: no value for argument {name}")
        if hint is not None:  # in parameter order, as the JIT builds it: the order is part of the key
            attrs[(i,)] = BaseBackend.parse_attr(hint)
    return sig, constexprs, attrs


def _jit_lists_every_parameter() -> bool:
    """Whether this triton's JIT gives every parameter an attribute entry (constexprs an empty one;
    triton 3.9) or only the parameters whose specialisation is a string (pointers, ints and str
    constexprs; triton 3.6). Part of the cache key, so the sweep follows whichever is installed."""
    import inspect

    from triton.runtime.jit import JITFunction

    try:
        return "if x[0] == 'constexpr'" in inspect.getsource(JITFunction._pack_args)
    except (AttributeError, OSError, TypeError):
        return True


def estimate(spec: Spec, cfg, cap: int) -> int | None:
    """The shared memory launch-time pruning expects for this compile (None: the kernel is not autotuned)."""
    if spec.kernel == "nf4":
        return None
    elem = torch.empty(0, dtype=_DTYPES[spec.dtype]).element_size()
    return tuning.config_shared_bytes(spec.kernel, cfg, dict(spec.constexprs), elem, cap)
