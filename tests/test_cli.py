"""Bad input fails early and clearly (DESIGN.md 4.5); interrupted conversions leave nothing valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_dense

from upcycle.cli import main


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "dense"
    make_dense("llama", path)
    return path


def _snapshot(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(root) for f in files)


def _fails(capsys, args, match, root):
    before = _snapshot(root)
    capsys.readouterr()  # drop what building the fixture printed
    try:
        code = main(args)
    except SystemExit as e:  # argparse errors exit directly
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and match in err, err
    assert _snapshot(root) == before  # nothing written, nothing of the user's touched


def _conv(src, out, *extra):
    return ["convert", "--model", str(src), "--out", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("extra, match", [
    (["--layers", "0"], "--layers must be between 1 and 4"),
    (["--layers", "5"], "--layers must be between 1 and 4"),
    (["--layer-ids", "1,1"], "duplicates: 1"),
    (["--layer-ids", "1,9"], "--layer-ids 9 out of range"),
    (["--layer-ids", "a,b"], "comma-separated layer indices"),
    (["--layers", "2", "--experts", "1"], "--experts must be at least 2"),
    (["--layers", "2", "--top-k", "0"], "--top-k must be between 1 and"),
    (["--layers", "2", "--experts", "4", "--top-k", "5"], "--top-k must be between 1 and"),
    (["--layers", "2", "--routing", "expert-choice", "--capacity", "0"], "--capacity must be a positive"),
    (["--layers", "2", "--routing", "expert-choice", "--capacity", "-1"], "--capacity must be a positive"),
    (["--layers", "2", "--reinit-ratio", "1.5"], "--reinit-ratio must be between 0 and 1"),
    (["--layers", "2", "--expert-noise", "-0.1"], "--expert-noise must be >= 0"),
    (["--experts", "4"], "give --layers N or --layer-ids"),
    (["--layers", "2", "--capacity", "1.25"], "--capacity does not apply to --routing topk"),
    (["--layers", "2", "--routing", "expert-choice", "--top-k", "2"], "--top-k does not apply"),
    (["--layers", "2", "--aux-loss-weight", "nan"], "--aux-loss-weight must be a finite number"),
    (["--layers", "2", "--router-std", "inf"], "--router-std must be > 0"),
])
def test_bad_convert_numbers(capsys, tmp_path, dense_dir, extra, match):
    _fails(capsys, _conv(dense_dir, tmp_path / "out", *extra), match, tmp_path)


def test_missing_model(capsys, tmp_path):
    _fails(capsys, _conv(tmp_path / "nope", tmp_path / "out", "--layers", "1"), "model not found", tmp_path)


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                             word_embed_proj_dim=32)).save_pretrained(tmp_path / "opt")
    _fails(capsys, _conv(tmp_path / "opt", tmp_path / "out", "--layers", "1"),
           "cannot upcycle architecture 'opt': its decoder layers have no MLP module", tmp_path)


def test_truncated_and_corrupted_safetensors(capsys, tmp_path):
    make_dense("llama", tmp_path / "trunc")
    f = tmp_path / "trunc" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(capsys, _conv(tmp_path / "trunc", tmp_path / "out", "--layers", "1"), "trunc", tmp_path)
    make_dense("llama", tmp_path / "garbled")
    g = tmp_path / "garbled" / "model.safetensors"
    raw = bytearray(g.read_bytes())
    raw[8:40] = b"\xff" * 32
    g.write_bytes(bytes(raw))
    _fails(capsys, _conv(tmp_path / "garbled", tmp_path / "out", "--layers", "1"), "garbled", tmp_path)


def test_existing_out_is_refused_and_kept(capsys, tmp_path, dense_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    _fails(capsys, _conv(dense_dir, out, "--layers", "1"), "already exists (pass --overwrite", tmp_path)


def test_unwritable_out(capsys, tmp_path, dense_dir):
    (tmp_path / "afile").write_text("x")
    _fails(capsys, _conv(dense_dir, tmp_path / "afile" / "out", "--layers", "1"), "not a writable directory", tmp_path)


def test_not_enough_disk_space(capsys, tmp_path, dense_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    _fails(capsys, _conv(dense_dir, tmp_path / "new" / "out", "--layers", "1"), "not enough free disk space", tmp_path)


def test_other_commands_bad_input(capsys, tmp_path):
    _fails(capsys, ["inspect", str(tmp_path / "nope")], "checkpoint not found", tmp_path)
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["inspect", str(tmp_path / "empty")], "no config.json", tmp_path)
    _fails(capsys, ["eval", str(tmp_path / "empty"), "--text", str(tmp_path / "none.txt")], "text file not found",
           tmp_path)


@pytest.mark.oldest
def test_convert_inspect_eval_generate(capsys, tmp_path, dense_dir):
    out = tmp_path / "moe"
    assert main(_conv(dense_dir, out, "--layers", "2", "--experts", "4", "--json")) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["layer_ids"] == [2, 3] and res["peak_rss_mb"] > 0
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_experts"] == 4
    # --overwrite replaces a complete checkpoint with a complete one.
    assert main(_conv(dense_dir, out, "--layers", "1", "--experts", "2", "--overwrite")) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["moe_layer_ids"] == [3]
    for args in (["convert"], ["inspect"], ["eval"], ["generate"]):
        with pytest.raises(SystemExit) as e:
            main([*args, "--help"])
        assert e.value.code == 0
        assert "usage: upcycle" in capsys.readouterr().out


# --- interrupted conversions -------------------------------------------------------------

@pytest.fixture(scope="module")
def big_dense_dir(tmp_path_factory):
    # Large enough that conversion takes a moment: 4 layers x 16 experts x 6 MB.
    path = tmp_path_factory.mktemp("big") / "dense"
    make_dense("llama", path, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=8)
    return path


def _start_and_wait_for_shard(src, out):
    proc = subprocess.Popen([sys.executable, "-m", "upcycle", *_conv(src, out, "--layers", "4", "--experts", "16",
                                                                      "--max-shard-size", "20MB", "--overwrite")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    parent = os.path.dirname(out)
    while time.time() < deadline and proc.poll() is None:
        tmps = [d for d in os.listdir(parent) if ".upcycle-tmp-" in d]
        if tmps and len(os.listdir(os.path.join(parent, tmps[0]))) >= 2:  # mid-way through the shards
            return proc
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"conversion did not start writing shards: {proc.communicate()}")


def _valid_checkpoints(root):
    return [d for d, _, files in os.walk(root) if "config.json" in files]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_leaves_no_valid_checkpoint(tmp_path, big_dense_dir, sig):
    out = tmp_path / "out"
    proc = _start_and_wait_for_shard(big_dense_dir, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    assert _valid_checkpoints(tmp_path) == []
    if sig != signal.SIGKILL:  # a catchable signal cleans up its temporary directory too
        assert proc.returncode == 130 and "interrupted" in err
        assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, big_dense_dir, dense_dir):
    out = tmp_path / "out"
    assert main(_conv(dense_dir, out, "--layers", "1", "--experts", "2")) == 0
    before = _snapshot(out)
    proc = _start_and_wait_for_shard(big_dense_dir, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _snapshot(out) == before


@pytest.mark.oldest
def test_merge_and_inspect_adapter_commands(capsys, tmp_path, dense_dir):
    import upcycle
    from upcycle.adapters import LoraConfig, apply_lora, save_adapter

    assert main(_conv(dense_dir, tmp_path / "moe", "--layers", "2", "--experts", "4")) == 0
    model = apply_lora(upcycle.load(str(tmp_path / "moe")), LoraConfig(r=4))
    save_adapter(model, str(tmp_path / "adapter"), str(tmp_path / "moe"))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged" in capsys.readouterr().out
    assert (tmp_path / "merged" / "config.json").is_file()
    # An existing --out is refused; a base that is not the adapter's is refused.
    _fails(capsys, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")], "exists", tmp_path)
    _fails(capsys, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m2"), "--base", str(dense_dir)],
           "fingerprint", tmp_path)


def test_eval_baseline_is_the_recorded_source_wherever_it_runs(capsys, tmp_path, monkeypatch):
    # The repro: convert --model ttok (relative) in a/; then, from a/sub/, which holds another model saved
    # as ttok, eval --baseline compared the upcycle with that other model (perplexities 123,798 vs 92,308).
    import shutil

    from conftest import make_char_tokenizer

    a, sub = tmp_path / "a", tmp_path / "a" / "sub"
    for where, seed in ((a, 0), (sub, 1)):
        make_dense("llama", where / "ttok", seed=seed)
        make_char_tokenizer().save_pretrained(where / "ttok")
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 8)
    monkeypatch.chdir(a)
    assert main(_conv("ttok", "out/ttok", "--layers", "2", "--experts", "4")) == 0
    config = a / "out" / "ttok" / "config.json"
    assert json.loads(config.read_text())["upcycle"]["source"]["model"] == str(a / "ttok")  # recorded absolute
    monkeypatch.chdir(sub)
    ev = ["eval", str(a / "out" / "ttok"), "--text", str(text), "--baseline", "--json", "--no-progress"]
    capsys.readouterr()
    assert main(ev) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["results"][0]["model"] == str(a / "ttok") and r["max_abs_logit_diff"] < 1e-4  # a fresh upcycle: the dense
    # A checkpoint written before sources were recorded absolute: ./ttok here is the other model, so the recorded
    # one is found by its fingerprint beside the checkpoint's parents (where convert ran).
    raw = json.loads(config.read_text())
    raw["upcycle"]["source"]["model"] = "ttok"
    config.write_text(json.dumps(raw))
    assert main(ev) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["model"] == str(a / "ttok")
    raw["upcycle"]["source"]["model"] = str(a / "ttok")
    config.write_text(json.dumps(raw))
    # Moved away, or replaced by another model: one line naming the record (path, fingerprint) and what was found.
    want = raw["upcycle"]["source"]["fingerprint"]
    shutil.move(a / "ttok", tmp_path / "moved")
    _fails(capsys, ev, f"the dense source of {a / 'out' / 'ttok'}, {a / 'ttok'} (fingerprint {want}), is not found",
           tmp_path)
    shutil.copytree(sub / "ttok", a / "ttok")
    _fails(capsys, ev, f"is {a / 'ttok'} (fingerprint {want}), but {a / 'ttok'} has fingerprint sha256:", tmp_path)


def test_upcycled_source_and_source_as_out_are_refused(capsys, tmp_path, dense_dir):
    import shutil

    assert main(_conv(dense_dir, tmp_path / "moe", "--layers", "2", "--experts", "4")) == 0
    _fails(capsys, _conv(tmp_path / "moe", tmp_path / "again", "--layers", "1"), "is already upcycled", tmp_path)
    shutil.copytree(dense_dir, tmp_path / "src")
    _fails(capsys, _conv(tmp_path / "src", tmp_path / "src", "--layers", "1", "--overwrite"),
           "is the source model itself", tmp_path)


def test_damaged_checkpoints_fail_in_one_line(capsys, tmp_path, dense_dir):
    from safetensors.torch import load_file, save_file

    assert main(_conv(dense_dir, tmp_path / "moe", "--layers", "2", "--experts", "4")) == 0
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    f = tmp_path / "moe" / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.3.mlp.experts.down_proj"]
    save_file(tensors, f, metadata={"format": "pt"})
    _fails(capsys, ["eval", str(tmp_path / "moe"), "--text", str(text)], "missing keys", tmp_path)
    f.write_bytes(f.read_bytes()[:1000])
    _fails(capsys, ["generate", str(tmp_path / "moe"), "--prompt", "hi"], "truncated", tmp_path)
    (tmp_path / "moe" / "config.json").write_text("[1, 2]")
    _fails(capsys, ["inspect", str(tmp_path / "moe")], "not a model config", tmp_path)
    _fails(capsys, ["inspect", str(text)], "not a directory", tmp_path)


def test_eval_and_generate_flags_are_checked_before_loading(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    # The model path does not exist: a flag error proves the check ran first.
    for args, match in [(["eval", "nope", "--text", str(text), "--batch-size", "0"], "--batch-size must be"),
                        (["eval", "nope", "--text", str(text), "--seq-len", "1"], "--seq-len must be"),
                        (["generate", "nope", "--prompt", " "], "--prompt is empty"),
                        (["generate", "nope", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens")]:
        _fails(capsys, args, match, tmp_path)


def test_eval_refuses_whitespace_and_a_tokenizer_beyond_the_vocabulary(capsys, tmp_path):
    # train refuses a whitespace-only file as empty; eval gave it a perplexity. A tokenizer whose ids pass the
    # model's vocabulary ended eval (and generate, and train) in an IndexError traceback from the embedding.
    from conftest import make_char_tokenizer

    text = tmp_path / "t.txt"
    text.write_text(" \n\t\n")
    _fails(capsys, ["eval", "nope", "--text", str(text)], f"{text} is empty: no text to evaluate", tmp_path)
    model = tmp_path / "small-vocab"
    make_dense("llama", model, vocab_size=64)
    make_char_tokenizer().save_pretrained(model)  # ids up to 100
    text.write_text("Zebras")  # lower-case letters have ids 70 and up
    _fails(capsys, ["eval", str(model), "--text", str(text), "--no-progress"],
           "the text, as the tokenizer encodes it, has token id", tmp_path)
    _fails(capsys, ["generate", str(model), "--prompt", "Zebras", "--no-chat-template"],
           "beyond the model's vocabulary (64 embeddings): the tokenizer does not belong to this model", tmp_path)


def test_merge_shows_progress_unless_told_not_to(capsys, tmp_path, dense_dir):
    import upcycle
    from upcycle.adapters import LoraConfig, apply_lora, save_adapter

    assert main(_conv(dense_dir, tmp_path / "moe", "--layers", "2", "--experts", "4")) == 0
    save_adapter(apply_lora(upcycle.load(str(tmp_path / "moe")), LoraConfig(r=4)), str(tmp_path / "ad"),
                 str(tmp_path / "moe"))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "ad"), "--out", str(tmp_path / "m1")]) == 0
    assert "merging: 100%" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "ad"), "--out", str(tmp_path / "m2"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_checkpoint_moved_aside_by_a_killed_overwrite_is_restored(tmp_path, dense_dir, capsys):
    out = tmp_path / "out"
    assert main(_conv(dense_dir, out, "--layers", "1", "--experts", "2")) == 0
    before = _snapshot(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.rename(tmp_path / f".out.upcycle-old-{dead.stdout.strip()}")  # killed between the two renames
    # The next run puts it back, and then refuses to replace it without --overwrite.
    assert main(_conv(dense_dir, out, "--layers", "1")) == 2
    assert "already exists" in capsys.readouterr().err
    assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["out"]
