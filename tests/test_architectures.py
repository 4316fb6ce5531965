"""Every family in the architecture table upcycles exactly, trains, serves; the rest is refused clearly.

    python -m pytest -q tests/test_architectures.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_readme_block, make_char_tokenizer
from families import make_family, tiny_config
from tolerances import TOLERANCES

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main
from upcycle.moe import aux_loss, moe_blocks
from upcycle.arch import FAMILIES, families_markdown

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

F32 = TOLERANCES[torch.float32]
FAMILY_IDS = sorted(FAMILIES)


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(5, 110, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (dense model, top-2 upcycle dir, expert-choice upcycle dir), made once per family."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            dense = make_family(family, root / "dense")
            make_char_tokenizer().save_pretrained(root / "dense")
            for routing in ("topk", "expert-choice"):
                upcycle.convert(ConvertConfig(out=str(root / routing), model=str(root / "dense"), layers=2,
                                              moe=MoEConfig(num_experts=4, routing=routing), progress=False))
            made[family] = dense, root / "topk", root / "expert-choice"
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_fresh_upcycle_is_the_dense_model(converted, family):
    dense, topk, ec = converted(family)
    ids = _ids()
    want = dense(input_ids=ids).logits
    moe = upcycle.load(str(topk), experts_backend="grouped_mm")
    assert len(moe_blocks(moe)) == 2
    torch.testing.assert_close(moe(input_ids=ids).logits, want, **F32)
    # Expert choice with batch 1: every expert takes the token, weights summing to 1 (a soft mixture
    # of identical experts): the dense model too.
    ec_model = upcycle.load(str(ec), experts_backend="loop")
    torch.testing.assert_close(ec_model(input_ids=ids[:1]).logits, want[:1], **F32)
    # Plain transformers after `import upcycle` loads the same model.
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(str(topk)).eval()
    assert type(auto) is type(moe)
    torch.testing.assert_close(auto(input_ids=ids).logits, want, **F32)


@pytest.mark.parametrize("family", FAMILY_IDS)
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_a_training_step_runs(converted, family, backend):
    _, topk, ec = converted(family)
    for path in (topk, ec):
        model = upcycle.load(str(path), experts_backend=backend).train()
        ids = _ids(4, 10, seed=1)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + aux_loss(model)
        loss.backward()
        assert torch.isfinite(loss)
        for block in moe_blocks(model).values():
            assert block.router.weight.grad.abs().sum() > 0
            assert block.experts.down_proj.grad.abs().sum() > 0


def test_backends_agree_on_every_activation_the_table_uses(converted):
    """Squared ReLU, GELU-tanh, GELU, SiLU: loop and grouped_mm give the same gradients."""
    for family in ("nemotron", "gemma", "gpt_neox", "llama", "phi"):
        _, topk, _ = converted(family)
        grads = []
        for backend in ("loop", "grouped_mm"):
            model = upcycle.load(str(topk), experts_backend=backend).train()
            ids = _ids(3, 8, seed=2)
            model(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if ".experts." in n})
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], **F32, msg=lambda m: f"{family} {name}: {m}")


@pytest.mark.parametrize("family", ["gpt2", "phi3", "nemotron"])
def test_inspect_eval_generate(converted, family, tmp_path, capsys):
    _, topk, _ = converted(family)
    assert main(["inspect", str(topk), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["moe_layer_ids"] == [2, 3] and info["architecture"].startswith("Upcycle")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    assert main(["eval", str(topk), "--text", str(text), "--seq-len", "32", "--no-progress", "--json",
                 "--experts-backend", "grouped_mm"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 100
    assert main(["generate", str(topk), "--prompt", "Hello", "--max-new-tokens", "4"]) == 0


def test_the_vision_language_checkpoint_keeps_its_vision_tower(converted):
    dense, topk, _ = converted("gemma3")
    moe = upcycle.load(str(topk), experts_backend="grouped_mm")
    assert moe.config.upcycle["layers"] == "model.language_model.layers"
    cfg = tiny_config("gemma3")
    n = cfg.mm_tokens_per_image
    ids = torch.cat([torch.tensor([[5, cfg.boi_token_index] + [cfg.image_token_index] * n + [cfg.eoi_token_index]]),
                     _ids(1, 6)], dim=1)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == cfg.image_token_index).long())
    torch.testing.assert_close(moe(**kw).logits, dense(**kw).logits, **F32)


def test_processor_files_travel_with_the_checkpoint(tmp_path):
    make_family("gemma3", tmp_path / "dense")
    make_char_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "X"}))
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(tmp_path / "dense"), layers=1,
                                  moe=MoEConfig(num_experts=2), progress=False))
    assert json.loads((tmp_path / "moe" / "preprocessor_config.json").read_text()) == {"image_processor_type": "X"}


def test_a_family_nobody_listed_converts_too(tmp_path):
    """GPT-J (parallel attention and MLP, fc_in / fc_out with biases) is in no table row."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert "gptj" not in FAMILIES
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gptj", n_embd=64, n_layer=3, n_head=4, n_inner=96, vocab_size=128, n_positions=64,
                               rotary_dim=8)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    dense.save_pretrained(tmp_path / "dense")
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(tmp_path / "dense"), layers=2,
                                  moe=MoEConfig(num_experts=3), progress=False))
    moe = upcycle.load(str(tmp_path / "moe"))
    ids = _ids()
    torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, **F32)
    # Registered by the load: plain transformers reads it from now on.
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"))) is type(moe)


def _save(tmp_path, model_type, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **kw)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.mark.parametrize("model_type,kw,reason", [
    ("bert", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True),
     "has 1 projections"),
    ("mixtral", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, num_local_experts=4, vocab_size=64), "is a mixture of experts already"),
    ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                 word_embed_proj_dim=32), "its decoder layers have no MLP module"),
])
def test_other_architectures_are_refused_in_one_line(tmp_path, capsys, model_type, kw, reason):
    src = _save(tmp_path, model_type, **kw)
    out = tmp_path / "out"
    assert main(["convert", "--model", str(src), "--layers", "1", "--experts", "2", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cannot upcycle architecture '{model_type}'" in err and reason in err
    assert "supported MLPs:" in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["dense"]


def test_readme_lists_the_table():
    assert_readme_block("families", families_markdown(),
                        'from upcycle.arch import families_markdown; print(families_markdown(), end="")')
