"""Adapter checkpoints wherever a model is taken: ``upcycle.load``, ``upcycle eval``, ``upcycle generate``.

Adapters from real ``upcycle train`` runs on a tiny upcycled model (LoRA, QLoRA, ESFT-subset LoRA):
loaded unmerged they give the training model's own logits at that step (the trainer's model object,
captured), LoRA also PEFT's own; ``merge=True`` gives ``upcycle merge``'s output; the CLI says which
model each row is; a missing or changed base, and a directory that is no model, are one line.

    python -m pytest -q tests/test_adapted.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
from tolerances import TOLERANCES

import upcycle
from test_train import corpus, recipe, tiny_moe  # noqa: F401  (fixtures)
from upcycle.cli import main
from upcycle.errors import UpcycleError
from upcycle.train import train

FP32 = TOLERANCES[torch.float32]
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:Unexpected keyword arguments \\['upcycle'\\]:UserWarning")

LORA = {"r": 4, "alpha": 8, "experts": True, "target_modules": ["q_proj", "v_proj"]}
# On the CPU wherever the suite runs: the trainer's model is compared with upcycle.load's, which loads there.
RUNS = {
    "lora": dict(lora=LORA, device="cpu"),
    "qlora": dict(lora=LORA, nf4=True, device="cpu"),
    "esft": dict(lora={**LORA, "target_modules": ["q_proj"]}, experts_subset={"top": 1, "sample": 8}, device="cpu"),
}


@pytest.fixture(scope="module")
def runs(tiny_moe, corpus, tmp_path_factory):  # noqa: F811
    """{kind: (adapter checkpoint, the trainer's own model at that step)} for three short real runs."""
    import upcycle.train.trainer as trainer_module

    root = tmp_path_factory.mktemp("adapted")
    out = {}
    for kind, kw in RUNS.items():
        built = []

        def capture(*a, _build=trainer_module.build_model, _into=built, **k):
            result = _build(*a, **k)
            _into.append(result[0])
            return result

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer_module, "build_model", capture)
            # lr 3e-2: three steps move the adapters far enough from zero that a wrong base would show.
            s = train(recipe(tiny_moe, corpus, root / kind, max_steps=3, optim__lr=3e-2, **kw))
        out[kind] = (s["last_checkpoint"], built[0].eval())
    return out


def _ids(seed=0):
    return torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=_ids() if ids is None else ids).logits


@pytest.mark.parametrize("kind", list(RUNS))
def test_load_gives_the_training_models_own_logits(runs, kind):
    ckpt, trained = runs[kind]
    model = upcycle.load(ckpt)
    assert model.upcycle_adapted.label == ("QLoRA adapter on its NF4 base" if kind == "qlora"
                                           else "LoRA adapter on its base")
    assert not model.training
    # The same base (NF4 for QLoRA: the same codes), the same adapter, the same compute: the same numbers.
    torch.testing.assert_close(_logits(model), _logits(trained), **FP32)


def test_qlora_loads_on_the_nf4_base_it_was_trained_on(runs, tiny_moe):  # noqa: F811
    from upcycle.adapters import NF4Linear, NF4StackedExperts, read_adapter_config

    ckpt, trained = runs["qlora"]
    record = read_adapter_config(ckpt)["upcycle"]["quantization"]
    mods = record["modules"]
    assert record["method"] == "nf4" and len(mods) == 4 * 4 + 2  # q/k/v/o of 4 layers, 2 MoE layers' experts
    assert {(e["blocksize"], e["double_quant"], e["dtype"], e["compute_dtype"]) for e in mods.values()} == {
        (64, True, "float32", "float32")}
    assert all(e["shared_base"] for e in mods.values() if e["kind"] == "experts")  # a fresh upcycle: one base
    model = upcycle.load(ckpt)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), NF4Linear)  # quantised, not adapted
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj.base_layer"), NF4Linear)
    experts = model.get_submodule("model.layers.3.mlp.experts.base_layer")
    assert isinstance(experts, NF4StackedExperts) and experts.shared_base
    # The NF4 codes are the trainer's, bit for bit.
    ours, theirs = model.state_dict(), trained.state_dict()
    nf4 = [k for k in theirs if "_packed" in k or "_absmax" in k]
    assert nf4 and all(torch.equal(ours[k], theirs[k]) for k in nf4)
    # ... and the NF4 base matters: folded into the full-precision base the adapter gives other logits.
    merged = upcycle.load(ckpt, merge=True)
    assert merged.upcycle_adapted.label == "adapter merged into its full-precision base"
    assert (_logits(merged) - _logits(model)).abs().max() > 1e-3


@pytest.mark.parametrize("settings", [
    dict(compute_dtype=torch.bfloat16),  # what a CUDA run records
    dict(blocksize=128, double_quant=False, shared_base=False, targets=("q_proj", "o_proj")),
], ids=["bf16-compute", "blocksize128-single-unshared"])
def test_the_record_rebuilds_whatever_quantize_model_did(tiny_moe, tmp_path, settings):  # noqa: F811
    from upcycle.adapters import LoraConfig, apply_lora, quantize_model, save_adapter

    model = upcycle.load(str(tiny_moe))
    quantize_model(model, **settings)
    apply_lora(model, LoraConfig(r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, str(tmp_path / "ad"), base_path=str(tiny_moe))
    loaded = upcycle.load(str(tmp_path / "ad"))
    # The same buffers, codes and adapter, the same compute dtype: the same numbers, bit for bit.
    assert torch.equal(_logits(loaded), _logits(model.eval()))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@needs_peft
def test_lora_load_equals_peft_on_the_base(runs, tiny_moe):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt, _ = runs["lora"]
    want = _logits(upcycle.load(ckpt))
    peft_model = PeftModel.from_pretrained(upcycle.load(str(tiny_moe)), ckpt).eval()
    torch.testing.assert_close(_logits(peft_model), want, **FP32)
    # transformers' own loader for the base (after import upcycle), PEFT's for the adapter.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_moe)), ckpt).eval()
    torch.testing.assert_close(_logits(peft_model), want, **FP32)


@pytest.mark.parametrize("kind", list(RUNS))
def test_merge_true_is_upcycle_merges_output(runs, kind, tmp_path):
    from upcycle.adapters import merge_command

    ckpt, _ = runs[kind]
    r = merge_command(ckpt, str(tmp_path / "merged"))
    assert torch.equal(_logits(upcycle.load(ckpt, merge=True)), _logits(upcycle.load(r["out"])))


def test_eval_and_generate_take_an_adapter(runs, tiny_moe, corpus, capsys):  # noqa: F811
    from upcycle.inference import generate, perplexity
    from upcycle.models.loader import load_model_and_tokenizer

    text = str(corpus / "eval.txt")
    for kind in ("lora", "qlora"):
        ckpt, _ = runs[kind]
        ev = ["eval", ckpt, "--text", text, "--max-tokens", "200", "--seq-len", "32", "--no-progress"]
        assert main([*ev, "--baseline", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)["results"]
        # The base by default, then the adapter; each row says which model it is.
        assert [x["model"] for x in r] == [str(tiny_moe), ckpt]
        label = "QLoRA adapter on its NF4 base" if kind == "qlora" else "LoRA adapter on its base"
        assert [x["kind"] for x in r] == ["base", label]
        model, tok = load_model_and_tokenizer(ckpt)
        want = perplexity(model, tok, open(text).read(), 200, 32, 4, progress=False)["nll"]
        assert r[1]["nll"] == pytest.approx(want, rel=1e-6) and r[1]["nll"] != pytest.approx(r[0]["nll"], rel=1e-4)
        assert main([*ev, "--merge"]) == 0
        table = capsys.readouterr().out
        assert f"{ckpt} (adapter merged into its full-precision base)" in table
        assert main(["generate", ckpt, "--prompt", "the king", "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out.rstrip("\n") == generate(model, tok, "the king", 8)
    # The plain table, with the base named explicitly (same fingerprint: accepted).
    ckpt, _ = runs["qlora"]
    assert main(["eval", ckpt, "--text", text, "--max-tokens", "64", "--baseline", "--base", str(tiny_moe),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{tiny_moe} (base)" in out and f"{ckpt} (QLoRA adapter on its NF4 base)" in out


def _fails(capsys, args, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("upcycle: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def test_missing_or_changed_base_is_one_line(runs, tiny_moe, corpus, tmp_path, capsys):  # noqa: F811
    ckpt, _ = runs["lora"]
    ad = tmp_path / "ad"
    shutil.copytree(ckpt, ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    want = cfg["upcycle"]["base_fingerprint"]
    text = str(corpus / "eval.txt")
    # Moved away: the record names the path and fingerprint; --base gives the right one.
    moved = str(tmp_path / "moved")
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": moved}))
    for args in (["eval", str(ad), "--text", text], ["generate", str(ad), "--prompt", "hi"]):
        _fails(capsys, args, f"the base of adapter {ad}, {moved} (fingerprint {want}), is not found")
    with pytest.raises(UpcycleError, match="name the right one: --base BASE"):
        upcycle.load(str(ad))
    assert main(["generate", str(ad), "--prompt", "hi", "--max-new-tokens", "2", "--base", str(tiny_moe)]) == 0
    capsys.readouterr()
    # Changed (another model at the recorded path, or named with --base): the fingerprints differ.
    other = tmp_path / "other"
    shutil.copytree(tiny_moe, other)
    from safetensors.torch import load_file, save_file

    for f in other.glob("*.safetensors"):
        w = load_file(str(f))
        w = {k: v + 1e-3 if k.endswith("norm.weight") else v for k, v in w.items()}
        save_file(w, str(f), metadata={"format": "pt"})
    for args in (["eval", ckpt, "--text", text, "--base", str(other)],
                 ["generate", ckpt, "--prompt", "hi", "--base", str(other)]):
        _fails(capsys, args, f"(fingerprint {want}), but {other} has fingerprint sha256:")
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(other)}))
    with pytest.raises(UpcycleError, match=f"is {other} \\(fingerprint {want}\\), but {other} has fingerprint"):
        upcycle.load(str(ad))


def test_a_directory_that_is_no_model_is_one_line(runs, tiny_moe, corpus, tmp_path, capsys):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    text = str(corpus / "eval.txt")
    msg = f"{empty} is neither a model nor an adapter: it has no config.json"
    for args in (["eval", str(empty), "--text", text], ["generate", str(empty), "--prompt", "hi"],
                 ["inspect", str(empty)]):
        _fails(capsys, args, msg)
    with pytest.raises(UpcycleError, match="is neither a model nor an adapter"):
        upcycle.load(str(empty))
    # A training run's directory: where its checkpoints are.
    run = os.path.dirname(os.path.dirname(runs["lora"][0]))
    _fails(capsys, ["eval", run, "--text", text], f"its checkpoints are in {run}/checkpoints")
    # Adapter flags on a model that is no adapter; an adapter as the model a recipe trains.
    _fails(capsys, ["eval", str(tiny_moe), "--text", text, "--merge"], "--merge applies to an adapter directory")
    _fails(capsys, ["generate", str(tiny_moe), "--prompt", "hi", "--base", str(tiny_moe)], "base (--base) applies")
    with pytest.raises(UpcycleError, match="is an adapter: train on its base"):
        train(recipe(runs["lora"][0], corpus, tmp_path / "again", lora=LORA))


def test_inspect_says_what_the_adapter_was_trained_on(runs, capsys):
    main(["inspect", runs["qlora"][0], "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "QLoRA adapter (LoRA on an NF4 base)"
    assert info["base_quantization"] == ("NF4 (double quantisation, blocksize 64): 16 Linear, 2 experts "
                                         "(2 with a shared base)")
    main(["inspect", runs["lora"][0], "--json"])
    assert json.loads(capsys.readouterr().out)["base_quantization"] == "full precision"


def test_adapters_saved_before_the_record_existed(runs, tmp_path):
    ckpt, trained = runs["qlora"]
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    cfg = json.loads((old / "adapter_config.json").read_text())
    del cfg["upcycle"]["quantization"]
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    # A training checkpoint: its trainer_state.pt says the run was QLoRA, and how that trainer quantised.
    model = upcycle.load(str(old))
    assert model.upcycle_adapted.label == "QLoRA adapter on its NF4 base"
    torch.testing.assert_close(_logits(model), _logits(trained), **FP32)
    # No checkpoint to ask: the full-precision base, and a warning that says so.
    os.remove(old / "trainer_state.pt")
    with pytest.warns(UserWarning, match="does not record whether its base was quantised"):
        model = upcycle.load(str(old))
    assert model.upcycle_adapted.label == "LoRA adapter on its base"
