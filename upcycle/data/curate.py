"""LIMA-style curation (Zhou et al. 2023): a small, clean, diverse SFT set from a large pool.

    pool = load_chat_pool("dialogue", cfg)               # ~9k conversations
    kept, report = curate(pool, CurateConfig(), seed=0)  # 1000, round-robin across topics

Quality first (length bounds, mostly-non-alphabetic responses, duplicate prompts, optionally
near-duplicate examples), then diversity: a round-robin across groups (topic or source),
seeded shuffle inside each group, until ``target`` examples. Deterministic for a given seed.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter, defaultdict

import numpy as np

from .config import CurateConfig

_NON_WORD = re.compile(r"[\W_]+")
# MinHash: NUM_PERM hashes split into BANDS bands; two examples become candidates when one band
# agrees in full, i.e. with probability 1 - (1 - J^ROWS)^BANDS (~0.99 at J = 0.8, ~0.2 at J = 0.4).
_NUM_PERM, _BANDS = 64, 16
_ROWS = _NUM_PERM // _BANDS
_PRIME = (1 << 31) - 1
_rng = np.random.default_rng(0x5EED)  # fixed permutations: the same prompt always hashes the same
_A = _rng.integers(1, _PRIME, _NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, _NUM_PERM, dtype=np.uint64)


def normalise(text: str) -> str:
    """Lowercase, punctuation and whitespace collapsed: "What is AI?" == "what is  AI"."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def prompt_text(messages: list[dict]) -> str:
    """What the model is asked: the user turns, joined."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def response_text(messages: list[dict]) -> str:
    """What the model learns to say: the assistant turns, joined."""
    return "\n".join(m["content"] for m in messages if m["role"] == "assistant")


def _alpha_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(1, len(chars))


def _minhash(key: str) -> np.ndarray:
    """[NUM_PERM] MinHash signature of the word trigrams of a normalised text."""
    words = key.split()
    grams = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
    h = np.array([zlib.crc32(g.encode()) for g in grams], dtype=np.uint64)
    # (a * h + b) mod p < 2^63: a < 2^31 and h < 2^32, so uint64 never overflows.
    return ((_A[:, None] * h[None, :] + _B[:, None]) % _PRIME).min(axis=1)


class _NearDups:
    """Kept examples' MinHash signatures, bucketed by band (LSH), to find near-duplicates fast."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.buckets: dict[tuple, list[np.ndarray]] = defaultdict(list)

    def seen(self, key: str) -> bool:
        """True if ``key`` nearly duplicates a kept text; else remember it and return False."""
        sig = _minhash(key)
        bands = [(b, sig[b * _ROWS:(b + 1) * _ROWS].tobytes()) for b in range(_BANDS)]
        for band in bands:
            if any(np.mean(sig == other) >= self.threshold for other in self.buckets.get(band, ())):
                return True
        for band in bands:
            self.buckets[band].append(sig)
        return False


def quality_filter(pool: list[dict], cfg: CurateConfig, removed: Counter) -> list[dict]:
    kept = []
    for ex in pool:
        prompt, response = prompt_text(ex["messages"]), response_text(ex["messages"])
        if not response.strip():
            reason = "no_response"
        elif len(prompt) < cfg.min_prompt_chars:
            reason = "prompt_too_short"
        elif len(response) < cfg.min_response_chars:
            reason = "response_too_short"
        elif len(response) > cfg.max_response_chars:
            reason = "response_too_long"
        elif _alpha_fraction(response) < cfg.min_alpha_fraction:
            reason = "mostly_non_alpha"
        else:
            kept.append((len(response), normalise(prompt), ex))
            continue
        removed[reason] += 1
    # Among duplicates, the longest response wins (stable: then the earliest in the pool).
    kept.sort(key=lambda t: -t[0])
    seen: set[str] = set()
    near = _NearDups(cfg.near_dup_threshold) if cfg.near_dup_threshold is not None else None
    out = []
    for _, key, ex in kept:
        if cfg.dedup and key in seen:
            removed["duplicate_prompt"] += 1
        elif near is not None and near.seen(key + " " + normalise(response_text(ex["messages"]))):
            removed["near_duplicate"] += 1
        else:
            seen.add(key)
            out.append(ex)
    return out


def curate(pool: list[dict], cfg: CurateConfig, seed: int = 0) -> tuple[list[dict], dict]:
    """Keep at most ``cfg.target`` examples of ``pool`` (``load_chat_pool`` rows): (kept, report).

    kept is in round-robin order (consecutive examples come from different groups). The report
    (plain JSON) gives the pool size, the examples removed per filter, the groups, and the
    examples kept per group and per source; a pool smaller than target after filtering is kept
    whole and ``short_of_target`` says by how much.
    """
    cfg.validate()
    removed: Counter = Counter()
    clean = quality_filter(pool, cfg, removed)
    groups: dict[str, list[dict]] = defaultdict(list)
    for ex in clean:
        groups[str(ex[cfg.balance_by])].append(ex)
    rng = random.Random(seed)
    order = sorted(groups)
    for name in order:  # sorted first: the shuffles must not depend on the pool's order
        members = sorted(groups[name], key=lambda ex: (prompt_text(ex["messages"]), response_text(ex["messages"])))
        rng.shuffle(members)
        groups[name] = members
    rng.shuffle(order)  # which groups get one more example in the last, partial round
    kept: list[dict] = []
    depth = 0
    while len(kept) < cfg.target and len(kept) < len(clean):
        kept += [groups[name][depth] for name in order if depth < len(groups[name])][: cfg.target - len(kept)]
        depth += 1
    per_group = Counter(str(ex[cfg.balance_by]) for ex in kept)
    report = {
        "pool": len(pool),
        "removed": {k: removed[k] for k in ("no_response", "prompt_too_short", "response_too_short",
                                            "response_too_long", "mostly_non_alpha", "duplicate_prompt",
                                            "near_duplicate")},
        "after_filters": len(clean),
        "target": cfg.target,
        "kept": len(kept),
        "short_of_target": max(0, cfg.target - len(kept)),
        "balance_by": cfg.balance_by,
        "groups": len(groups),
        "kept_per_group": dict(sorted(per_group.items(), key=lambda kv: (-kv[1], kv[0]))),
        "kept_per_source": dict(sorted(Counter(ex["source"] for ex in kept).items())),
    }
    return kept, report
