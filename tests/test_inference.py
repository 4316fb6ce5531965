"""Perplexity and routing statistics over an evaluation (``upcycle eval``)."""

from __future__ import annotations

import math

import pytest
from conftest import make_dense

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.inference import perplexity, routing_table
from upcycle.moe import RoutingStats

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions


class ByteTokenizer:
    """Token i = byte value mod 128: enough for windows of real text on a 128-token model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b % 128 for b in text.encode()]}


TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 6


def test_upcycled_perplexity_equals_dense_and_routing_adds_up(tmp_path):
    dense = make_dense("llama", tmp_path / "dense")
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(tmp_path / "dense"), layers=2,
                                  moe=MoEConfig(num_experts=4, top_k=2), progress=False))
    moe = upcycle.load(str(tmp_path / "moe"))
    want = perplexity(dense, ByteTokenizer(), TEXT, seq_len=48, batch_size=3, progress=False)
    got = perplexity(moe, ByteTokenizer(), TEXT, seq_len=48, batch_size=3, progress=False)
    assert got["tokens"] == want["tokens"] == len(TEXT) - math.ceil(len(TEXT) / 48)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert want["routing"] == {} and set(got["routing"]) == {"model.layers.2.mlp", "model.layers.3.mlp"}
    for stats in got["routing"].values():
        # Every token of every window went to exactly K = 2 experts.
        assert stats["num_tokens"] == len(TEXT) and sum(stats["tokens_per_expert"]) == 2 * len(TEXT)
        assert 0 < stats["entropy"] <= math.log(4) + 1e-6
    assert "model.layers.2" in routing_table(got["routing"])


def test_routing_stats_combine_weights_by_tokens():
    a = RoutingStats([3, 1], num_tokens=2, num_assignments=4, dropped_fraction=0.0, unrouted_fraction=0.5,
                     entropy=0.2, z=1.0)
    b = RoutingStats([0, 12], num_tokens=6, num_assignments=12, dropped_fraction=0.25, unrouted_fraction=0.0,
                     entropy=0.6, z=3.0)
    c = RoutingStats.combine([a, b])
    assert c.tokens_per_expert == [3, 13] and c.num_tokens == 8 and c.num_assignments == 16
    assert c.unrouted_fraction == pytest.approx(0.125) and c.dropped_fraction == pytest.approx(0.1875)
    assert c.entropy == pytest.approx(0.5) and c.z == pytest.approx(2.5)


def test_bad_eval_numbers():
    dense = make_dense("llama")
    with pytest.raises(upcycle.UpcycleError, match="--seq-len must be at least 2"):
        perplexity(dense, ByteTokenizer(), TEXT, seq_len=1)
    with pytest.raises(upcycle.UpcycleError, match="fewer than 2 tokens"):
        perplexity(dense, ByteTokenizer(), "x")
