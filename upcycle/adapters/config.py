"""``LoraConfig``: where a LoRA adapter goes and how big it is (what a recipe's ``lora`` section holds).

Plain data and its checks, nothing that builds modules: parsing a recipe reads this alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from upcycle.errors import UpcycleError


def check_rank(r: int, alpha: float, dropout: float) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UpcycleError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise UpcycleError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise UpcycleError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


@dataclass
class LoraConfig:
    """A LoRA adapter: where it goes and how big it is."""

    r: int = 8
    """Rank of every update ``B A``."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only). PEFT cannot load expert LoRA with dropout > 0."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """``nn.Linear`` modules to adapt. A list matches like PEFT's: a name equal to the module's
    qualified name or to its last dotted parts (``q_proj``, ``self_attn.q_proj``); entries may
    use shell wildcards (``layers.1*.self_attn.?_proj``). A single string is a regular
    expression that must match the whole qualified name (PEFT's rule for strings)."""
    experts: bool = True
    """LoRA on the stacked experts of every MoE layer (per-expert A and B on both projections), and on
    the projections of its shared expert if it has one (Linear LoRA, like ``target_modules``)."""
    train_router: bool = False
    """Train the MoE routers fully (saved with the adapter, like PEFT's ``modules_to_save``)."""
    shared_base: bool | str = "auto"
    """With ``experts``: store the frozen base of experts that are exact copies (a fresh upcycle)
    ONCE per layer (``SharedStackedExperts``: E times less memory for it; same outputs and
    gradients). ``"auto"``: where the experts are identical; True: all must be (else
    UpcycleError); False: never. Not saved with the adapter (a property of the base in memory,
    not of the adapter): the same adapter file loads onto a shared or an unshared base."""

    def validate(self) -> None:
        check_rank(self.r, self.alpha, self.dropout)
        t = self.target_modules
        if not (isinstance(t, str) or (isinstance(t, (list, tuple)) and all(isinstance(p, str) for p in t))):
            raise UpcycleError(f"LoRA target_modules must be a list of names or one regex string, got {t!r}")
        if isinstance(t, str):
            try:
                re.compile(t)
            except re.error as e:
                raise UpcycleError(f"LoRA target_modules regex {t!r} is invalid: {e}") from None
        if self.shared_base not in (True, False, "auto"):
            raise UpcycleError(f"LoRA shared_base must be True, False or 'auto', got {self.shared_base!r}")
