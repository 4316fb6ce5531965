"""Datasets -> tokenised training examples: packed text (CPT) and masked chat (SFT).

    from upcycle.data import DataConfig, CurateConfig, build_datasets, collate
    cfg = DataConfig(kind="chat", train="dialogue", seq_len=512, curate=CurateConfig(target=1000))
    train, eval_, report = build_datasets(cfg, tokenizer, seed=0)
    batch = collate([train[i] for i in range(8)], pad_id=tokenizer.pad_token_id)

Built-in offline datasets: ``shakespeare`` (text), ``chatterbot``, ``chitchat`` and ``dialogue``
(both; chat). Anything else is a local file / directory / glob or a hub dataset name.
"""

from .build import build_datasets
from .chat import encode_chat, encode_chats
from .config import CurateConfig, DataConfig
from .curate import curate
from .corpora import BUILTINS, HELDOUT_PLAYS, load_chat_pool, load_text, play_of, shakespeare_files
from .text import IGNORE_INDEX, collate, pack_documents

__all__ = [
    "BUILTINS", "HELDOUT_PLAYS", "IGNORE_INDEX", "CurateConfig", "DataConfig", "build_datasets", "collate",
    "curate", "encode_chat", "encode_chats", "load_chat_pool", "load_text", "pack_documents", "play_of",
    "shakespeare_files",
]
