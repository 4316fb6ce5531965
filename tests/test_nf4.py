"""NF4 quantisation and the frozen QLoRA bases (issue 4, items 3, 4 and 6).

    python -m pytest -q tests/test_nf4.py

Reference quantisers (FP4 E2M1 and symmetric Int4, same block size and absmax) live here;
bitsandbytes is optional (its code-equality test skips without it); the Triton dequant kernel
runs on the CPU interpreter (``TRITON_INTERPRET=1``, set by conftest.py) without a GPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_dense
from safetensors.torch import load_file, save_file
from tolerances import TOLERANCES
from torch import nn

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.adapters.nf4 import (
    DQ_BLOCKSIZE,
    NF4_CODE,
    NF4Tensor,
    dequantize_nf4,
    dynamic_code,
    quantize_nf4,
)
from upcycle.adapters.qlora import NF4Linear, NF4StackedExperts, experts_identical, quantize_model
from upcycle.errors import UpcycleError
from upcycle.moe import MoEBlock

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

F32 = TOLERANCES[torch.float32]


def _gauss(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- reference quantisers

def _blocks(w, blocksize):
    w_BK = w.reshape(-1, blocksize).float()
    return w_BK, w_BK.abs().amax(-1, keepdim=True)


def _fp4_e2m1(w, blocksize=64):
    """FP4 E2M1 (values 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives), block absmax mapped to 6."""
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    grid = torch.cat([-grid.flip(0), grid])
    w_BK, am = _blocks(w, blocksize)
    s = w_BK / am * 6
    q = grid[(s.unsqueeze(-1) - grid).abs().argmin(-1)]
    return (q * am / 6).reshape(w.shape)


def _int4_sym(w, blocksize=64):
    """Symmetric Int4: levels -7..7 of absmax / 7 per block."""
    w_BK, am = _blocks(w, blocksize)
    scale = am / 7
    return (torch.clamp(torch.round(w_BK / scale), -7, 7) * scale).reshape(w.shape)


def _mse(a, b):
    return (a.float() - b.float()).pow(2).mean().item()


# ---------------------------------------------------------------- quantisation itself

def test_nf4_roundtrip_error_beats_fp4_and_int4_on_gaussian_weights():
    w = _gauss(512, 1024)
    mse = {"nf4": _mse(dequantize_nf4(quantize_nf4(w, 64, double_quant=False)), w),
           "nf4+dq": _mse(dequantize_nf4(quantize_nf4(w, 64)), w),
           "fp4": _mse(_fp4_e2m1(w), w), "int4": _mse(_int4_sym(w), w)}
    print("round-trip MSE on N(0,1), blocksize 64:", {k: f"{v:.5f}" for k, v in mse.items()})
    assert mse["nf4"] < mse["fp4"] and mse["nf4"] < mse["int4"]
    assert mse["nf4+dq"] < mse["fp4"] and mse["nf4+dq"] < mse["int4"]


@pytest.mark.parametrize("double_quant, expected", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)])
def test_bits_per_param(double_quant, expected):
    q = quantize_nf4(_gauss(1024, 1024), 64, double_quant)
    # + 32 bits of offset per tensor with double quantisation: 3e-5 bits per parameter here.
    assert q.bits_per_param == pytest.approx(expected, abs=1e-4)
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors())
    if double_quant:
        assert round(q.bits_per_param, 3) == 4.127


def test_double_quant_stays_within_the_dynamic_map_rounding_of_single_quant():
    w = _gauss(300, 257, seed=3)  # 77100 elements: short last block of 64 and of 256 absmax
    single, double = quantize_nf4(w, 64, False), quantize_nf4(w, 64, True)
    assert torch.equal(single.packed, double.packed)  # the 4-bit codes use the exact absmax
    # 8-bit dynamic map: the error of a quantised absmax is at most half the map's widest gap
    # times its 256-block's scale (absmax2); every weight moves by at most that (|code| <= 1).
    half_gap = dynamic_code().diff().max().item() / 2
    bound_B = half_gap * double.absmax2.repeat_interleave(DQ_BLOCKSIZE)[: single.absmax.numel()] * (1 + 1e-6)
    assert ((double.absmax_fp32() - single.absmax).abs() <= bound_B + 1e-7).all()
    dw = (dequantize_nf4(double) - dequantize_nf4(single)).abs().reshape(-1)
    bound_N = bound_B.repeat_interleave(64)[: w.numel()] + 1e-7
    assert (dw <= bound_N).all()
    assert _mse(dequantize_nf4(double), w) <= 1.01 * _mse(dequantize_nf4(single), w)


def test_dequant_returns_the_original_dtype_and_shape():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = _gauss(3, 5, 7, dtype=dtype)
        out = dequantize_nf4(quantize_nf4(w))
        assert out.dtype == dtype and out.shape == w.shape
    assert dequantize_nf4(quantize_nf4(_gauss(4, 64)), torch.bfloat16).dtype == torch.bfloat16


def test_quantize_rejects_bad_input():
    with pytest.raises(UpcycleError, match="floating"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(UpcycleError, match="blocksize"):
        quantize_nf4(_gauss(64), blocksize=63)
    with pytest.raises(UpcycleError, match="backend"):
        dequantize_nf4(quantize_nf4(_gauss(64)), backend="cuda")


def test_nf4_codes_follow_the_midpoint_rule_with_ties_to_the_lower_code():
    code = torch.tensor(NF4_CODE)
    mids = (code[:-1] + code[1:]) / 2
    # One block whose absmax is 1: the values are already normalised.
    x = torch.cat([torch.tensor([1.0]), mids, code, torch.nextafter(mids, torch.tensor(2.0))])
    x = torch.cat([x, torch.zeros(64 - x.numel() % 64)])
    q = quantize_nf4(x, 64, double_quant=False)
    idx = torch.stack([q.packed >> 4, q.packed & 15], -1).reshape(-1).long()
    n = len(NF4_CODE) - 1
    assert idx[1:1 + n].tolist() == list(range(n))  # exactly on a midpoint: the lower code
    assert idx[1 + n:1 + n + 16].tolist() == list(range(16))
    assert idx[1 + n + 16:1 + 2 * n + 16].tolist() == list(range(1, n + 1))  # one ulp above: the upper


# ---------------------------------------------------------------- bitsandbytes equality

def test_codes_equal_bitsandbytes_nf4():
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    assert torch.equal(dynamic_code(), bnb_f.create_dynamic_map(signed=True))
    default = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes' dequant compiles itself otherwise (slow)
        for shape, blocksize, dtype in [((128, 192), 64, torch.float32), ((33, 17), 64, torch.bfloat16),
                                        ((700, 99), 64, torch.float16), ((64, 256), 128, torch.float32)]:
            w = _gauss(*shape, seed=blocksize, dtype=dtype)
            ours = quantize_nf4(w, blocksize, double_quant=False)
            packed, st = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
            absmax = st.absmax
            assert torch.equal(ours.packed, packed.reshape(-1)), (shape, blocksize)
            assert torch.equal(ours.absmax, st.absmax)
            assert torch.equal(dequantize_nf4(ours), bnb_f.dequantize_4bit(packed, st))

            ours = quantize_nf4(w, blocksize, double_quant=True)
            packed, st = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
            assert torch.equal(ours.packed, packed.reshape(-1))
            assert torch.equal(ours.offset, st.offset) and torch.equal(ours.absmax2, st.state2.absmax)
            # bitsandbytes' torch backend (the rule its CUDA kernel follows) gives our 8-bit codes
            # exactly. Its CPU C++ path rounds through a 65536-bin lookup table instead, so a few
            # absmax that fall within one bin of a midpoint get the neighbouring code there.
            q_ref, a2_ref = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
                default, absmax - st.offset, dynamic_code(), DQ_BLOCKSIZE)
            assert torch.equal(ours.absmax, q_ref) and torch.equal(ours.absmax2, a2_ref)
            diff = (ours.absmax.int() - st.absmax.int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 0.02
            # Our state in bitsandbytes' hands dequantises to our bits.
            st.absmax = ours.absmax.clone()
            assert torch.equal(dequantize_nf4(ours), bnb_f.dequantize_4bit(packed, st))


# ---------------------------------------------------------------- triton kernel

@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_dequant_equals_torch_bit_for_bit(double_quant):
    pytest.importorskip("upcycle_kernels", reason="triton is not installed")
    for shape, blocksize in [((64, 129), 64), ((3, 7), 64), ((5, 40, 64), 128), ((2049,), 32)]:
        w = _gauss(*shape, seed=sum(shape)) * 3
        q = quantize_nf4(w.to("cuda") if torch.cuda.is_available() else w, blocksize, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = dequantize_nf4(q, dtype, backend="torch")
            assert torch.equal(dequantize_nf4(q, dtype, backend="triton"), ref), (shape, blocksize, dtype)


# ---------------------------------------------------------------- NF4Linear

def test_nf4_linear_forward_within_the_quantisation_bound():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    q_lin = NF4Linear.from_linear(lin)
    x = _gauss(4, 10, 256, seed=1)
    w_hat = dequantize_nf4(q_lin.nf4("weight"))
    with torch.no_grad():
        y, y_hat = lin(x), q_lin(x)
    # Exactly a Linear over the dequantised weight (fp32 compute on the CPU) ...
    torch.testing.assert_close(y_hat, F.linear(x, w_hat, lin.bias), **F32)
    # ... so the error obeys Cauchy-Schwarz: |y - y_hat|[t, o] <= ||x_t|| * ||W_o - W_hat_o||.
    bound = x.norm(dim=-1, keepdim=True) * (lin.weight - w_hat).norm(dim=-1) + 1e-5
    assert ((y - y_hat).abs() <= bound).all()
    assert y_hat.dtype == x.dtype and q_lin.bias.dtype == torch.float32 and not q_lin.bias.requires_grad


def test_nf4_linear_backward_reaches_the_input_only():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    q_lin = NF4Linear.from_linear(lin)
    x = _gauss(6, 128, seed=2).requires_grad_()
    g = _gauss(6, 64, seed=3)
    q_lin(x).backward(g)
    torch.testing.assert_close(x.grad, g @ dequantize_nf4(q_lin.nf4("weight")), **F32)
    assert not any(p.requires_grad for p in q_lin.parameters())


def test_nf4_linear_bf16_compute():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    q_lin = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    x = _gauss(8, 128, seed=4)
    ref = F.linear(x, dequantize_nf4(q_lin.nf4("weight")))
    out = q_lin(x)
    assert out.dtype == torch.float32
    # bf16 inputs and weights: relative rounding ~2**-8 per operand, summed over 128 products.
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantising_a_range_gives_the_bits_of_the_whole(double_quant):
    from upcycle.adapters.nf4 import dequantize_nf4_range

    g = torch.Generator().manual_seed(0)
    for shape in [(5, 37, 67), (3, 300, 64), (3, 7), (3, 128, 128)]:
        q = quantize_nf4(_gauss(*shape, seed=2), 64, double_quant)
        for dtype in (torch.float32, torch.bfloat16):
            whole = dequantize_nf4(q, dtype).flatten()
            n = whole.numel()
            cuts = [(0, n), (0, 0), (n, n), (1, n - 1)] + [tuple(sorted(torch.randint(0, n + 1, (2,), generator=g)
                                                                     .tolist())) for _ in range(20)]
            cuts += [(64 * a, 64 * b) for a, b in ((0, 1), (1, 3), (2, 5)) if 64 * b <= n]  # whole blocks: the fast path
            for a, b in cuts:
                assert torch.equal(dequantize_nf4_range(q, a, b, dtype), whole[a:b]), (shape, a, b)
            # The triton kernel (CUDA, here the interpreter) on a range that starts on a constants boundary.
            step = 64 * (256 if double_quant else 1)
            for a, b in ((0, n), (step, n)) if n > step else ((0, n),):
                got = dequantize_nf4_range(q, a, b, dtype, backend="triton")
                assert torch.equal(got, whole[a:b]), (shape, a, b)
    with pytest.raises(UpcycleError, match="not inside"):
        dequantize_nf4_range(q, 3, q.numel + 1)


# ---------------------------------------------------------------- NF4StackedExperts

def _block(E=4, D=64, Fn=128, gated=True, bias=False, seed=0, identical=False):
    torch.manual_seed(seed)
    blk = MoEBlock(MoEConfig(num_experts=E, top_k=2), D, Fn, gated=gated, activation="silu" if gated else "gelu",
                   bias=bias)
    with torch.no_grad():
        for p in blk.experts.parameters():
            p.normal_(0, 0.1)
            if identical:
                p.copy_(p[:1].expand_as(p))
    return blk.eval()


def _dense_copy(blk, q_experts):
    """``blk`` with its experts' weights replaced by the dequantised NF4 ones."""
    ref = copy.deepcopy(blk)
    w_in, w_down = q_experts.dense_weights(torch.float32)
    with torch.no_grad():
        ref.experts.w_in_EMD.copy_(w_in)
        ref.experts.down_proj.copy_(w_down)
    return ref


@pytest.mark.parametrize("gated, bias", [(True, False), (False, True)])
def test_nf4_experts_close_to_the_unquantised_block(gated, bias):
    blk = _block(gated=gated, bias=bias)
    q = NF4StackedExperts.from_experts(blk.experts)
    assert not q.shared_base
    ref = _dense_copy(blk, q)
    qblk = copy.deepcopy(blk)
    qblk.experts = q
    x = _gauss(2, 9, 64, seed=5)
    with torch.no_grad():
        y = blk(x)
        for backend in ("loop", "grouped_mm"):
            q.backend = ref.experts.backend = backend
            y_hat = qblk(x)
            torch.testing.assert_close(y_hat, ref(x), **F32)  # same math on the dequantised weights
    # Two quantised matrices in series: to first order their relative errors add, so the
    # block's relative error stays below 2.5x the larger relative weight error (margin for the
    # activation's curvature).
    eps_w = max(((w - w_hat).norm() / w.norm()).item()
                for w, w_hat in zip((blk.experts.w_in_EMD, blk.experts.down_proj), q.dense_weights()))
    rel = ((y - y_hat).norm() / y.norm()).item()
    print(f"NF4 experts: weight rel. error {eps_w:.4f}, block output rel. error {rel:.4f}")
    assert rel <= 2.5 * eps_w


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("lora", [False, True])
def test_blockwise_dequantised_experts_equal_dequantise_then_gemm_bit_for_bit(backend, lora, monkeypatch):
    """The NF4 experts forward dequantises a block of experts at a time (forward, and again for dx in
    backward), never the whole stack, and skips experts without tokens; what it computes is exactly
    the dense experts forward on the dequantised weights."""
    from upcycle.adapters import nf4 as nf4_mod
    from upcycle.adapters import qlora
    from upcycle.adapters.lora import LoraExperts
    from upcycle.moe import compute

    E, D, Fn = 6, 64, 96
    blk = _block(E=E, D=D, Fn=Fn, bias=True)
    q = NF4StackedExperts.from_experts(blk.experts, shared_base=False)
    ref = _dense_copy(blk, q).experts.requires_grad_(False)
    q.backend = ref.backend = backend
    # Blocks of two experts (a [2F, D] weight is 48 KB in fp32), and a record of what gets dequantised.
    monkeypatch.setattr(compute, "DEQUANT_BLOCK_BYTES", 2 * 2 * Fn * D * 4)
    seen = []

    def spy(qt, start, stop, dtype=None):
        seen.append((stop - start) // (qt.numel // E))
        return nf4_mod.dequantize_nf4_range(qt, start, stop, dtype)

    monkeypatch.setattr(qlora, "dequantize_nf4_range", spy)
    T = 13
    tok = torch.arange(T).repeat_interleave(2)
    exp = torch.tensor([0, 1, 3, 0, 1, 3] * 5)[:2 * T]  # experts 2, 4 and 5 get no token
    wts = torch.rand(2 * T, generator=torch.Generator().manual_seed(0))
    mods = [ref, q]
    if lora:
        torch.manual_seed(3)
        mods = [LoraExperts(m, r=4, alpha=8) for m in mods]
        with torch.no_grad():
            for p in mods[0].parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
            for a, b in zip(mods[0].parameters(), mods[1].parameters()):
                if a.requires_grad:
                    b.copy_(a)
    outs, grads = [], []
    for m in mods:
        x, w = _gauss(T, D, seed=4).requires_grad_(), wts.clone().requires_grad_()
        y = m(x, tok, exp, w)
        y.pow(2).sum().backward()
        outs.append(y)
        grads.append([x.grad, w.grad] + [p.grad for p in m.parameters() if p.requires_grad])
    assert torch.equal(outs[1], outs[0])
    assert len(grads[1]) == (6 if lora else 2) and all(torch.equal(a, b) for a, b in zip(grads[1], grads[0]))
    # Experts dequantised per call, forward and backward: loop, one routed expert (0, 1, 3) at a time per
    # projection; grouped_mm, blocks of 2 of the [2F, D] gate_up ({0, 1}, {2, 3}) and of 4 of the [D, F]
    # down projection ({0..3}); the block of experts 4 and 5 has no token and is never dequantised.
    assert sorted(seen) == ([1] * 12 if backend == "loop" else [2, 2, 2, 2, 4, 4])


def test_nf4_experts_gradient_through_the_blockwise_dequantised_forward():
    blk = _block(bias=True)
    q = NF4StackedExperts.from_experts(blk.experts)
    ref = _dense_copy(blk, q).experts
    for p in ref.parameters():
        p.requires_grad_(False)
    x = _gauss(11, 64, seed=6)
    tok = torch.arange(11).repeat_interleave(2)
    exp = torch.tensor([0, 1, 2, 3, 1, 2] * 4)[:22]
    wts = torch.rand(22, generator=torch.Generator().manual_seed(0))
    grads = []
    for mod in (ref, q):
        xi, wi = x.clone().requires_grad_(), wts.clone().requires_grad_()
        mod(xi, tok, exp, wi).pow(2).sum().backward()
        grads.append((xi.grad, wi.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], **F32)
    torch.testing.assert_close(grads[1][1], grads[0][1], **F32)
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("double_quant", [False, True])
def test_shared_base_matches_per_expert_quantisation_with_E_times_less_memory(double_quant):
    E = 8
    blk = _block(E=E, identical=True)
    assert experts_identical(blk.experts)
    shared = NF4StackedExperts.from_experts(blk.experts, double_quant=double_quant)  # auto -> shared
    per_expert = NF4StackedExperts.from_experts(blk.experts, double_quant=double_quant, shared_base=False)
    assert shared.shared_base and not per_expert.shared_base
    x = _gauss(3, 7, 64, seed=7)
    with torch.no_grad():
        for backend in ("loop", "grouped_mm"):
            shared.backend = per_expert.backend = backend
            ys = copy.deepcopy(blk).requires_grad_(False)
            yp = copy.deepcopy(blk).requires_grad_(False)
            ys.experts, yp.experts = shared, per_expert
            a, b = ys(x), yp(x)
            if double_quant:
                # The offset is the mean of E copies of the absmax instead of one: equal up to
                # the summation order's last-bit rounding.
                torch.testing.assert_close(a, b, **F32)
            else:
                assert torch.equal(a, b), backend
    ratio = per_expert.quantized_nbytes / shared.quantized_nbytes
    print(f"shared base: {per_expert.quantized_nbytes} -> {shared.quantized_nbytes} bytes ({ratio:.2f}x, E={E})")
    assert 0.98 * E <= ratio <= E * 1.001


@pytest.mark.parametrize("identical", [False, True])
def test_nf4_experts_triton_backend_matches_loop(identical):
    pytest.importorskip("upcycle_kernels", reason="triton is not installed")
    blk = _block(E=4, D=32, Fn=64, identical=identical)
    q = NF4StackedExperts.from_experts(blk.experts)
    assert q.shared_base == identical  # shared: a stride-0 expert dim reaches the kernels
    blk.experts = q
    x = _gauss(1, 6, 32, seed=8)
    outs = []
    for backend in ("loop", "triton"):
        q.backend = backend
        xi = x.clone().requires_grad_()
        y = blk(xi)
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, **F32)


def test_shared_base_refused_for_experts_that_differ():
    blk = _block()
    assert not experts_identical(blk.experts)
    with pytest.raises(UpcycleError, match="exact copies"):
        NF4StackedExperts.from_experts(blk.experts, shared_base=True)


# ---------------------------------------------------------------- whole model

def test_quantize_model_on_a_fresh_upcycle(tmp_path):
    make_dense("llama", tmp_path / "dense")
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(tmp_path / "dense"),
                                  moe=MoEConfig(num_experts=4), layers=2, progress=False))
    model = upcycle.load(str(tmp_path / "moe")).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    qmodel = copy.deepcopy(model)
    rep = quantize_model(qmodel)
    n_layers = model.config.num_hidden_layers
    assert rep["num_linear"] == 4 * n_layers and rep["num_experts_modules"] == 2
    assert rep["num_shared_base"] == 2 and rep["shared_base_saving_bytes"] > 0
    assert rep["bytes_after"] < rep["bytes_before"] / 7
    print("quantize_model report:", rep)
    # The quantised model is the original with every quantised weight replaced by its
    # dequantised value (fp32 compute on the CPU) ...
    ref = copy.deepcopy(model)
    qmods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            qm = qmods.get(name)
            if isinstance(qm, NF4Linear):
                mod.weight.copy_(qm.dequantized_weight())
            elif isinstance(qm, NF4StackedExperts):
                w_in, w_down = qm.dense_weights(torch.float32)
                mod.w_in_EMD.copy_(w_in)
                mod.down_proj.copy_(w_down)
        q_logits = qmodel(ids).logits
        torch.testing.assert_close(q_logits, ref(ids).logits, **F32)
    rel = ((q_logits - logits).norm() / logits.norm()).item()
    print(f"fresh upcycle, NF4 attention + experts: relative logit error {rel:.4f}")
    # NF4's ~10% relative weight error in 4 Linears and 2 experts matrices per layer, partly
    # damped by the un-quantised residual stream and norms: 0.16 measured here.
    assert rel < 0.25


def test_quantize_model_refuses_when_nothing_matches():
    with pytest.raises(UpcycleError, match="nothing to quantise"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)))


def test_lora_over_nf4_bases_starts_as_a_noop_and_trains_only_the_adapters():
    lora = pytest.importorskip("upcycle.adapters.lora", reason="the LoRA modules are not there yet")
    blk = _block(bias=True)
    blk.experts = NF4StackedExperts.from_experts(blk.experts)
    q_lin = NF4Linear.from_linear(nn.Linear(64, 64))
    x = _gauss(2, 5, 64, seed=9)
    with torch.no_grad():
        y_blk, y_lin = blk(x), q_lin(x)
    blk.experts = lora.LoraExperts(blk.experts, r=4, alpha=8)
    lin = lora.LoraLinear(q_lin, r=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), y_blk, **F32)
        torch.testing.assert_close(lin(x), y_lin, **F32)
    (blk(x).sum() + lin(x).sum()).backward()
    trained = {n for n, p in [*blk.named_parameters(), *lin.named_parameters()] if p.grad is not None}
    assert trained and all("lora_" in n or n.startswith("router") for n in trained), trained


# ---------------------------------------------------------------- save / load

def test_nf4_tensor_safetensors_roundtrip(tmp_path):
    for dq in (True, False):
        q = quantize_nf4(_gauss(3, 33, 65, dtype=torch.bfloat16), 64, dq)
        save_file(q.state_dict("w."), tmp_path / "q.safetensors")
        back = NF4Tensor.from_state_dict(load_file(tmp_path / "q.safetensors"), "w.")
        assert (back.shape, back.dtype, back.blocksize, back.double_quant) == (q.shape, q.dtype, 64, dq)
        for a, b in zip(back.tensors(), q.tensors()):
            assert torch.equal(a, b)
        assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))


def test_modules_safetensors_roundtrip_into_fresh_modules(tmp_path):
    torch.manual_seed(0)
    lin = NF4Linear.from_linear(nn.Linear(64, 32))
    save_file(lin.state_dict(), tmp_path / "lin.safetensors")
    fresh = NF4Linear(64, 32, bias=True)
    fresh.load_state_dict(load_file(tmp_path / "lin.safetensors"))
    x = _gauss(5, 64)
    assert torch.equal(fresh(x), lin(x))

    for identical in (True, False):
        blk = _block(bias=True, identical=identical)
        q = NF4StackedExperts.from_experts(blk.experts)
        save_file(q.state_dict(), tmp_path / "ex.safetensors")
        fresh = NF4StackedExperts(4, 64, 128, gated=True, activation="silu", bias=True, shared_base=identical)
        fresh.load_state_dict(load_file(tmp_path / "ex.safetensors"))
        for a, b in zip(fresh.dense_weights(), q.dense_weights()):
            assert torch.equal(a, b)
        tok, exp = torch.arange(5).repeat(2), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
        w = torch.rand(10)
        with torch.no_grad():
            assert torch.equal(fresh(x, tok, exp, w), q(x, tok, exp, w))


def test_dtype_casts_leave_the_quantised_storage_alone():
    lin = NF4Linear.from_linear(nn.Linear(64, 32, bias=False))
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    lin.to(torch.bfloat16)
    for k, v in lin.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    # 2048 weights: 4 bits + 8 per 64 + one fp32 absmax2 and one fp32 offset for the tensor.
    assert math.isclose(lin.nf4("weight").bits_per_param, 4 + 8 / 64 + 64 / 2048)


def test_the_kernels_nf4_literals_are_the_code_table():
    nf4_kernel = pytest.importorskip("upcycle_kernels.nf4", reason="triton is not installed")
    assert torch.equal(torch.tensor(nf4_kernel.NF4_VALUES, dtype=torch.float32), torch.tensor(NF4_CODE))
