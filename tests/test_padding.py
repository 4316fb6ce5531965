"""Padding is invisible (DESIGN.md invariant 4.6): whatever sits at a masked position changes
nothing of the real tokens, for every routing scheme; unpadded batches route as before.

    python -m pytest -q tests/test_padding.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_char_tokenizer, make_dense
from tolerances import TOLERANCES

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.moe import MoEBlock, aux_loss, moe_blocks, routing_stats

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

F32 = TOLERANCES[torch.float32]
VOCAB = 128

SCHEMES = {
    "topk": MoEConfig(num_experts=4, top_k=2),
    "topk-capacity": MoEConfig(num_experts=4, top_k=2, topk_capacity_factor=1.0),
    "expert-choice": MoEConfig(num_experts=4, routing="expert-choice", capacity=1.0),
    "expert-choice-sequence": MoEConfig(num_experts=4, routing="expert-choice", capacity=1.0, ec_group="sequence"),
}


def _upcycle(tmp_path, moe: MoEConfig, name: str = "moe"):
    """A tiny Llama whose experts differ (noise) and whose router is decisive, so routing matters."""
    dense = tmp_path / f"{name}-dense"
    make_dense("llama", dense, seed=1)
    make_char_tokenizer().save_pretrained(dense)
    out = tmp_path / name
    with pytest.warns(UserWarning) if moe.ec_group == "sequence" and moe.routing == "expert-choice" else _nothing():
        upcycle.convert(ConvertConfig(out=str(out), model=str(dense), layers=2, moe=moe, expert_noise=0.05,
                                      router_std=0.5, progress=False))
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _right_padded(seed: int = 0):
    """ids [4, 10], mask with 0, 3, 5 and 7 pads at the end of the rows, labels -100 at the pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (4, 10), generator=g)
    lengths = torch.tensor([10, 7, 5, 3])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _step(model, ids, mask, labels):
    """Real-token logits, the loss (CE + aux), every gradient and the routing statistics."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    aux = aux_loss(model)
    (ce + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: s.to_dict() for n, s in routing_stats(model).items()}
    return logits[mask.bool()].detach(), ce.detach(), aux.detach(), grads, stats


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_ids_at_padded_positions_change_nothing_real(tmp_path, scheme):
    model = upcycle.load(str(_upcycle(tmp_path, SCHEMES[scheme])), experts_backend="loop").train()
    ids, mask, labels = _right_padded()
    other = ids.clone()
    other[mask == 0] = torch.randint(5, VOCAB, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(7))
    a, b = _step(model, ids, mask, labels), _step(model, other, mask, labels)
    torch.testing.assert_close(b[0], a[0], **F32)  # real tokens' logits
    torch.testing.assert_close(b[1], a[1], **F32)  # language-model loss
    torch.testing.assert_close(b[2], a[2], **F32)  # auxiliary + z losses
    assert set(a[3]) == set(b[3]) and any(".mlp.router." in n for n in a[3])
    for name in a[3]:
        torch.testing.assert_close(b[3][name], a[3][name], **F32, msg=lambda m: f"grad of {name}: {m}")
    assert a[4] == b[4]
    real = int(mask.sum())
    for s in a[4].values():  # statistics count the real tokens only
        assert s["num_tokens"] == real


@pytest.mark.parametrize("scheme", ["topk", "expert-choice"])
def test_pads_get_no_expert_and_capacity_counts_real_tokens(scheme):
    torch.manual_seed(0)
    block = MoEBlock(SCHEMES[scheme], 16, 32, gated=True, activation="silu", backend="loop")
    x = torch.randn(4, 3, 16)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    y = block(x, token_mask=mask)
    assert torch.equal(y[~mask], torch.zeros(int((~mask).sum()), 16))
    r = block.route(x, mask)
    assert set(r.token_idx_A.tolist()) <= set(mask.reshape(-1).nonzero().squeeze(1).tolist())
    assert r.probs_TE.shape[0] == int(mask.sum())
    if scheme == "expert-choice":
        # Groups are positions: 3, 2 and 1 real tokens -> C = ceil(1.0 * n / 4) = 1 each, per expert.
        assert r.tokens_per_expert_E.tolist() == [3] * 4
        # The real tokens of each group alone give the same routing as the padded batch.
        for s, n in enumerate(mask.sum(0).tolist()):
            alone = block.route(x[:n, s:s + 1])
            group = (r.token_idx_A % 3 == s)
            assert sorted(r.weight_A[group].tolist()) == pytest.approx(sorted(alone.weight_A.tolist()))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_unpadded_batches_route_exactly_as_without_a_mask(tmp_path, scheme):
    model = upcycle.load(str(_upcycle(tmp_path, SCHEMES[scheme])), experts_backend="loop").train()
    ids = torch.randint(5, VOCAB, (3, 8), generator=torch.Generator().manual_seed(3))
    with_mask = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    aux_with = aux_loss(model)
    assert all(b.token_mask is None for b in moe_blocks(model).values())
    without = model(input_ids=ids).logits
    assert torch.equal(with_mask, without) and torch.equal(aux_with, aux_loss(model))


def test_the_mask_belongs_to_the_model_that_ran(tmp_path):
    """Two models: the second one's forward does not hand its mask to the first one's blocks."""
    first = upcycle.load(str(_upcycle(tmp_path, SCHEMES["topk"], "a")))
    second = upcycle.load(str(_upcycle(tmp_path, SCHEMES["topk"], "b")))
    ids, mask, _ = _right_padded()
    second(input_ids=ids, attention_mask=mask)
    assert all(b.token_mask is None for b in moe_blocks(first).values())
    assert all(torch.equal(b.token_mask, mask.bool()) for b in moe_blocks(second).values())


def test_left_padded_batched_generation_equals_one_prompt_alone(tmp_path):
    path = _upcycle(tmp_path, SCHEMES["topk"])
    model = upcycle.load(str(path), experts_backend="grouped_mm")
    tok = make_char_tokenizer()
    tok.padding_side = "left"
    prompts = ["To be, or not to be", "Hi", "What light through yonder"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for i, prompt in enumerate(prompts):
        one = tok([prompt], return_tensors="pt")
        alone = model.generate(**one, **kw)[0, one["input_ids"].shape[1]:]
        assert together[i].tolist() == alone.tolist(), prompt


def test_a_token_mask_of_the_wrong_shape_is_a_clear_error():
    block = MoEBlock(SCHEMES["topk"], 16, 32, gated=True, activation="silu")
    with pytest.raises(upcycle.UpcycleError, match=r"token mask of shape \(2, 3\).*expected \[batch, seq\] = \(1, 3\)"):
        block(torch.randn(1, 3, 16), token_mask=torch.ones(2, 3, dtype=torch.bool))


def test_activation_checkpointing_routes_the_recomputation_like_the_forward(tmp_path):
    """Backward re-runs the blocks after the forward returned: they must still see its mask."""
    path = _upcycle(tmp_path, SCHEMES["expert-choice"])
    ids, mask, labels = _right_padded()
    plain = upcycle.load(str(path), experts_backend="loop").train()
    ckpt = upcycle.load(str(path), experts_backend="loop").train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    a, b = _step(plain, ids, mask, labels), _step(ckpt, ids, mask, labels)
    for name in a[3]:
        torch.testing.assert_close(b[3][name], a[3][name], **F32, msg=lambda m: f"grad of {name}: {m}")
