"""Training: one engine (``Trainer``) behind every recipe, single process or torchrun.

    from upcycle.train import load_recipe, train
    summary = train(load_recipe("continued_pretraining", ["max_steps=50", "out=runs/cpt-50"]))

Command line: ``upcycle train RECIPE [key=value ...]``; ``upcycle plot RUN_DIR``.
"""

from upcycle.train.config import OptimConfig, ScheduleConfig, TrainConfig, builtin_recipes, load_recipe
from upcycle.train.trainer import Trainer, TrainingDiverged, train

__all__ = ["OptimConfig", "ScheduleConfig", "TrainConfig", "Trainer", "TrainingDiverged", "builtin_recipes",
           "load_recipe", "train"]
