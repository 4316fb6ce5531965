"""`upcycle plot RUN_DIR`: metrics.jsonl -> PNGs; resumed and killed runs still plot, bad input fails clearly."""

from __future__ import annotations

import ast
import json
import os

import pytest

from upcycle.errors import UpcycleError
from upcycle.train.plot import plot_run, read_metrics

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train(step, loss=3.0, layers=0, experts=8, skew=0.0):
    routing = {}
    for i in range(layers):
        raw = [1.0 + skew * (e - experts / 2) / experts for e in range(experts)]
        load = [x / sum(raw) for x in raw]
        routing[f"model.layers.{2 * i}.mlp"] = {
            "load": load, "load_min": min(load) * experts, "load_max": max(load) * experts,
            "load_entropy": 0.97, "dropped": 0.0, "unrouted": 0.0, "z": 12.1, "router_entropy": 2.1,
            "dead_experts": 0}
    return {"type": "train", "step": step, "epoch": step / 100, "tokens": 4096 * step, "loss": loss,
            "aux_loss": 0.01 if layers else 0.0, "lr": 1e-4 * min(1.0, step / 5), "grad_norm": 1.0,
            "tokens_per_s": 800.0, "elapsed_s": 5.0 * step, "routing": routing, "future_key": [1, 2]}


def _write(run_dir, rows, tail=""):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        f.write(tail)
    return str(run_dir)


def _assert_pngs(paths, out_dir, names):
    assert sorted(os.path.basename(p) for p in paths) == sorted(names)
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == PNG_SIGNATURE and os.path.getsize(p) > 1000, p
    # Atomic writes leave no temp files behind.
    assert sorted(os.listdir(out_dir)) == sorted(names)


def test_dense_run_writes_loss_only(tmp_path):
    run = _write(tmp_path / "dense", [{"type": "meta", "recipe": {"lr": 1e-4}}]
                 + [_train(s, loss=4 - s / 10) for s in range(1, 21)]
                 + [{"type": "eval", "step": 10, "loss": 3.1, "ppl": 22.2, "tokens": 40960},
                    {"type": "eval", "step": 20, "loss": 2.5, "ppl": 12.2, "tokens": 81920},
                    {"type": "some_future_type", "x": 1}])
    paths = plot_run(run)
    _assert_pngs(paths, os.path.join(run, "plots"), ["loss.png"])
    import matplotlib.image

    assert matplotlib.image.imread(paths[0]).ndim == 3


def test_moe_run_writes_routing_heatmaps(tmp_path):
    run = _write(tmp_path / "moe", [_train(s, layers=2, experts=8, skew=s / 10) for s in range(10, 110, 10)]
                 + [{"type": "eval", "step": 50, "loss": 2.9, "ppl": 18.2, "tokens": 1}])
    out = tmp_path / "elsewhere"
    paths = plot_run(run, str(out))
    _assert_pngs(paths, out, ["loss.png", "routing.png", "routing_summary.png"])
    assert not os.path.exists(os.path.join(run, "plots"))
    # Re-plotting a live run replaces the PNGs in place.
    assert plot_run(run, str(out)) == paths
    _assert_pngs(paths, out, ["loss.png", "routing.png", "routing_summary.png"])


def test_many_layers_stay_bounded(tmp_path):
    # 12 layers x 64 experts: the legend becomes a colourbar and the figure height is capped.
    run = _write(tmp_path / "big", [_train(s, layers=12, experts=64, skew=1.0) for s in (1, 2, 3)])
    paths = plot_run(run)
    import matplotlib.image

    height = matplotlib.image.imread(paths[1]).shape[0]
    assert height <= 48 * 100


def test_resumed_run_later_line_wins(tmp_path):
    first = [_train(s, loss=5.0) for s in range(1, 11)]
    rerun = [_train(s, loss=1.0) for s in range(7, 16)]  # resumed from the step-6 checkpoint
    evals = [{"type": "eval", "step": 10, "loss": 9.0}, {"type": "eval", "step": 10, "loss": 2.0}]
    run = _write(tmp_path / "resumed", first + evals[:1] + rerun + evals[1:])
    rows = read_metrics(run)
    train = {r["step"]: r["loss"] for r in rows if r["type"] == "train"}
    assert sorted(train) == list(range(1, 16))
    assert all(train[s] == 5.0 for s in range(1, 7)) and all(train[s] == 1.0 for s in range(7, 16))
    assert [r["loss"] for r in rows if r["type"] == "eval"] == [2.0]
    assert len(plot_run(run)) == 1


def test_truncated_last_line_is_ignored(tmp_path):
    run = _write(tmp_path / "killed", [_train(1), _train(2)], tail='{"type": "train", "step": 3, "lo')
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert len(plot_run(run)) == 1


def test_malformed_middle_line_names_file_and_line(tmp_path):
    run = _write(tmp_path / "bad", [_train(1), "{not json", _train(2)])
    with pytest.raises(UpcycleError, match=r"metrics\.jsonl:2: malformed") as e:
        read_metrics(run)
    assert "\n" not in str(e.value)
    run = _write(tmp_path / "bad2", [_train(1), "[1, 2]", _train(2)])
    with pytest.raises(UpcycleError, match=r"metrics\.jsonl:2: .*JSON object"):
        plot_run(run)


def test_missing_inputs_fail_clearly(tmp_path):
    with pytest.raises(UpcycleError, match="does not exist"):
        plot_run(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpcycleError, match="no metrics.jsonl"):
        plot_run(str(tmp_path / "empty"))
    run = _write(tmp_path / "fresh", [{"type": "meta", "recipe": {}}, {"type": "eval", "step": 0, "loss": 4.0}])
    with pytest.raises(UpcycleError, match="nothing to plot yet"):
        plot_run(run)
    assert not os.path.exists(os.path.join(run, "plots"))


def test_import_is_cheap():
    # `upcycle --help` imports the CLI's modules; matplotlib/numpy must load only when plotting.
    import upcycle.train.plot as mod

    tree = ast.parse(open(mod.__file__).read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not any(str(n).split(".")[0] in ("matplotlib", "numpy") for n in names)


def test_a_single_logged_step_is_drawn(tmp_path):
    # A line through one point draws nothing; the summary must still show each layer's value.
    run = _write(tmp_path / "one", [_train(1, layers=1, experts=4)])
    paths = plot_run(run)
    import matplotlib.image
    import numpy as np

    summary = matplotlib.image.imread(next(p for p in paths if p.endswith("routing_summary.png")))[..., :3]
    layer_colour = np.array([68, 1, 84]) / 255  # viridis(0): the only layer's colour
    assert (np.abs(summary - layer_colour).max(axis=-1) < 0.05).sum() > 20
