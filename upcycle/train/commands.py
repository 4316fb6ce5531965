"""The ``upcycle train`` and ``upcycle plot`` subcommands: flags in, one typed call out (see ``upcycle.cli``).

    upcycle train continued_pretraining max_steps=100
    upcycle plot runs/cpt
"""

from __future__ import annotations

import os
import shlex

from upcycle.errors import UpcycleError


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train with a recipe", description=(
        "Train an upcycled (or dense) model with a recipe: a YAML file or a built-in name. Settings "
        "override as key=value (dotted for sections: optim.lr=2e-5 data.seq_len=1024). Under torchrun every "
        "process runs this same command."))
    p.add_argument("recipe", help="recipe YAML path or built-in name (see --list)", nargs="?")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. max_steps=100 optim.lr=2e-5")
    p.add_argument("--list", action="store_true", help="list the built-in recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    p.set_defaults(func=_train)


def _train(a) -> None:
    from upcycle.train.config import builtin_recipes, load_recipe, recipe_path, to_yaml

    if a.list:
        for name in builtin_recipes():
            with open(recipe_path(name)) as f:
                first = f.readline().strip().lstrip("# ")
            print(f"{name:<24} {first}")
        return
    if not a.recipe:
        raise UpcycleError(f"give a recipe: a YAML file or one of {', '.join(builtin_recipes())}")
    cfg = load_recipe(a.recipe, a.overrides)
    if a.print_config:
        print(to_yaml(cfg), end="")
        return
    from upcycle.train import train

    s = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if s["stopped_by"]:
        again = shlex.join(["upcycle", "train", a.recipe, *[o for o in a.overrides if not o.startswith(("resume=", "overwrite="))],
                            "resume=auto"])
        print(f"stopped by {s['stopped_by']} at step {s['steps']}/{s['total_steps']}; checkpoint "
              f"{s['last_checkpoint']}; continue with: {again}")
        return
    ev = s["final_eval"]
    held_out = f", held-out loss {ev['loss']:.4f} (perplexity {ev['ppl']:.2f})" if ev else ""
    print(f"trained {s['steps']} steps ({s['tokens']:,} tokens) in {s['train_time_s']:.0f} s{held_out}; "
          f"checkpoint {s['last_checkpoint']}")


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot a training run", description=(
        "Write PNGs of a run's loss curves and, for MoE models, expert-load heatmaps over the steps."))
    p.add_argument("run_dir", help="the run directory (the recipe's out)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    p.set_defaults(func=_plot)


def _plot(a) -> None:
    from upcycle.train.plot import plot_run

    for path in plot_run(a.run_dir, a.out):
        print(f"wrote {path}")
