"""Models in and out: dense sources (HF directories, GGUF files, aliases, hub ids) and upcycled checkpoints.

* ``sources``: ``open_source(spec)`` -> a streaming view of a dense checkpoint (``hf_dir``, ``gguf``)
* ``upcycled``: ``load_upcycled`` / ``describe`` an upcycled checkpoint directory; ``esft``: ESFT checkpoints on one
* ``loader``: ``load`` (``upcycle.load``: picks the kind) and "a checkpoint, else the dense source", for eval,
  generate, merge and train
* ``recorded``: models named in a record (a checkpoint's source, an adapter's base): ``record_source`` writes
  one, ``reopen_source`` finds it again and checks its fingerprint, ``check_fingerprint`` checks a model given instead
"""

from upcycle.models.base import Source
from upcycle.models.loader import load, load_model, load_model_and_tokenizer
from upcycle.models.recorded import check_fingerprint, record_source, reopen_source
from upcycle.models.sources import (
           ALIASES,
           HUB_ALLOW_PATTERNS,
           TOKENIZER_FILES,
           open_source,
)
from upcycle.models.upcycled import describe

__all__ = ["ALIASES", "HUB_ALLOW_PATTERNS", "TOKENIZER_FILES", "Source", "check_fingerprint", "describe", "load",
           "load_model", "load_model_and_tokenizer", "open_source", "record_source", "reopen_source"]
