"""Training: one engine (``Trainer``) behind every recipe, single process or torchrun.

    from upcycle.train import load_recipe, train
    summary = train(load_recipe("continued_pretraining", ["max_steps=50", "out=runs/cpt-50"]))

Command line: ``upcycle train RECIPE [key=value ...]``; ``upcycle plot RUN_DIR``.

The names below load on first use: the CLI builds its parsers from ``upcycle.train.commands``
without importing the engine and its data stack (``datasets``) for commands that never train.
"""

import importlib

_EXPORTS = {
    "OptimConfig": "config", "ScheduleConfig": "config", "TrainConfig": "config", "builtin_recipes": "config",
    "load_recipe": "config", "Trainer": "trainer", "TrainingDiverged": "trainer", "train": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"upcycle.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'upcycle.train' has no attribute {name!r}")
