"""Plot a training run's metrics.jsonl as PNGs: loss/lr curves and per-layer expert load.

    upcycle plot runs/cpt                 # writes runs/cpt/plots/{loss,routing,routing_summary}.png

Also usable while the run is still going (or after it was killed): a partial last line is
skipped, and a resumed run's re-run steps replace the earlier ones.
"""

from __future__ import annotations

import json
import os
import re

from upcycle.errors import UpcycleError
from upcycle.io import atomic_path

METRICS_FILE = "metrics.jsonl"
MAX_FIG_HEIGHT_IN = 48.0  # 32 layers x 128 experts must still give a PNG a viewer can open
MAX_LOAD_COLOUR = 4.0  # load*E above this is "very overloaded"; a larger scale washes out 0.5..2
LEGEND_MAX_LAYERS = 8  # beyond this a legend hides the lines; colour by depth instead


def read_metrics(run_dir: str) -> list[dict]:
    """Parse RUN_DIR/metrics.jsonl into rows, in file order of each row's winning line.

    A resumed run re-logs the steps after its last checkpoint, so for a given
    (type, step) the LATER line wins. Rows without a step (e.g. ``meta``) are kept as-is.
    A final partial line (process killed mid-write) is ignored; a malformed line anywhere
    else raises UpcycleError naming the file and line.
    """
    if not os.path.exists(run_dir):
        raise UpcycleError(f"run directory {run_dir} does not exist")
    if not os.path.isdir(run_dir):
        raise UpcycleError(f"{run_dir} is not a directory (expected a training run directory)")
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise UpcycleError(f"{run_dir} has no {METRICS_FILE} (not a training run, or it has not logged yet)")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows: dict[object, dict] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            if lineno == len(lines):  # the writer was killed mid-line; the rest of the file is fine
                break
            msg = str(e).splitlines()[0]
            raise UpcycleError(f"{path}:{lineno}: malformed metrics line ({msg})") from None
        step = row.get("step")
        key = (row.get("type"), step) if isinstance(step, (int, float)) else ("line", lineno)
        rows.pop(key, None)  # re-insert so the order follows the winning (later) line
        rows[key] = row
    return list(rows.values())


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write loss.png (+ routing.png, routing_summary.png for MoE runs) and return their paths.

    ``out_dir`` defaults to RUN_DIR/plots. Each PNG is written to a temp name and renamed,
    so a crash never leaves a half-written image where a previous good one was.
    """
    rows = read_metrics(run_dir)
    train = _by_step(r for r in rows if r.get("type") == "train")
    if not train:
        raise UpcycleError(f"{os.path.join(run_dir, METRICS_FILE)} has no train rows: nothing to plot yet")
    evals = _by_step(r for r in rows if r.get("type") == "eval")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UpcycleError(f"cannot create plot directory {out_dir}: {e.strerror}") from None
    name = os.path.basename(os.path.abspath(run_dir))

    paths = [_save(_loss_figure(train, evals, name), out_dir, "loss.png")]
    layers = _routing_layers(train)
    if layers:
        paths.append(_save(_routing_figure(train, layers, name), out_dir, "routing.png"))
        paths.append(_save(_summary_figure(train, layers, name), out_dir, "routing_summary.png"))
    return paths


def _by_step(rows) -> list[dict]:
    """Rows with a numeric step, in step order (a resume can append steps out of order)."""
    return sorted((r for r in rows if isinstance(r.get("step"), (int, float))), key=lambda r: r["step"])


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) for rows that logged a number under ``key``."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _new_figure(width: float, height: float, nrows: int, **kw):
    # A bare Figure on an Agg canvas: no pyplot global state, no display, the caller's backend untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False, **kw)[:, 0]
    return fig, axes


def _line(ax, xs, ys, **kw):
    """A line that stays visible with one point (a run that logged one step): markers then."""
    ax.plot(xs, ys, **({"marker": "o", "ms": 4} if len(xs) == 1 else {}), **kw)


def _loss_figure(train, evals, name):
    fig, (ax, ax_lr) = _new_figure(10, 6, 2, gridspec_kw={"height_ratios": [3, 1.3]})
    _line(ax, *_series(train, "loss"), lw=1, label="train loss")
    if evals:
        ax.plot(*_series(evals, "loss"), "o-", ms=4, lw=1, label="eval loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{name}: loss")
    _line(ax_lr, *_series(train, "lr"), color="tab:green", lw=1, label="lr")
    ax_lr.set_ylabel("lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    aux_steps, aux = _series(train, "aux_loss")
    if any(v for v in aux):  # a dense run logs aux_loss=0; a flat zero line is noise
        ax_aux = ax_lr.twinx()
        _line(ax_aux, aux_steps, aux, color="tab:red", lw=1, label="aux_loss")
        ax_aux.set_ylabel("aux_loss")
        ax_lr.legend(handles=ax_lr.lines + ax_aux.lines, loc="upper right")
    ax_lr.set_xlabel("step")
    return fig


def _routing_layers(train) -> list[str]:
    """MoE layer names in depth order (numeric parts compared as numbers: layers.2 < layers.10)."""
    names = {k for r in train if isinstance(r.get("routing"), dict) for k in r["routing"]}
    return sorted(names, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def _layer_rows(train, layer):
    return [(r["step"], r["routing"][layer]) for r in train
            if isinstance(r.get("routing"), dict) and isinstance(r["routing"].get(layer), dict)]


def _routing_figure(train, layers, name):
    """One heatmap per layer: rows = experts, columns = logged steps, colour = load*E."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    grids = []
    for layer in layers:
        pts = [(s, st["load"]) for s, st in _layer_rows(train, layer) if isinstance(st.get("load"), list)]
        n_exp = max((len(load) for _, load in pts), default=0)
        load_ES = np.full((n_exp, len(pts)), np.nan)  # NaN (blank) where a row logged fewer experts
        for j, (_, load) in enumerate(pts):
            load_ES[: len(load), j] = np.asarray(load, dtype=float) * len(load)
        grids.append(([s for s, _ in pts], load_ES))
    n_exp = max((g.shape[0] for _, g in grids), default=1)
    peak = max((float(np.nanmax(g)) for _, g in grids if g.size and not np.isnan(g).all()), default=2.0)
    # Diverging around 1.0 (balanced): blue = starved (0 = dead expert), red = overloaded.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=min(max(peak, 2.0), MAX_LOAD_COLOUR))
    panel_in = min(max(0.8 + 0.012 * n_exp, 1.0), 2.5)
    height = min(1.0 + panel_in * len(layers), MAX_FIG_HEIGHT_IN)
    fig, axes = _new_figure(11, height, len(layers))
    fig.suptitle(f"{name}: expert load (load x E, 1.0 = balanced)")
    mesh = None
    for ax, layer, (steps, load_ES) in zip(axes, layers, grids):
        ax.set_title(layer, fontsize=8, loc="left")
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=7)
        if not steps:
            continue
        # Cell edges halfway between logged steps, so irregular logging (resumes) stays on a true step axis.
        s = np.asarray(steps, dtype=float)
        mid = (s[1:] + s[:-1]) / 2
        first = s[0] - (mid[0] - s[0] if len(s) > 1 else 0.5)
        last = s[-1] + (s[-1] - mid[-1] if len(s) > 1 else 0.5)
        x_edges = np.concatenate([[first], mid, [last]])
        y_edges = np.arange(load_ES.shape[0] + 1) - 0.5
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(load_ES), cmap="RdBu_r", norm=norm,
                             rasterized=True)
        ax.set_ylim(load_ES.shape[0] - 0.5, -0.5)  # expert 0 on top, like a table
        ax.yaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("step")
    if mesh is not None:
        # One shared scale; in a tall figure cap the bar at ~5 in and pin it to the top, where the eye starts.
        fig.colorbar(mesh, ax=list(axes), label="load x E", extend="max" if peak > norm.vmax else "neither",
                     shrink=min(1.0, 5.0 / height), anchor=(0.0, 1.0), panchor=(1.0, 1.0))
    return fig


def _summary_figure(train, layers, name):
    """load_min / load_max / load_entropy (and, for fine-grained experts, the de-grouped share) over steps,
    one line per MoE layer."""
    import matplotlib

    keys = [("load_min", "min load x E"), ("load_max", "max load x E"), ("load_entropy", "load entropy / log E")]
    # Fine-grained experts: the share of tokens whose choices span more copies than a whole-copy pick.
    fine = any("degrouped" in st for layer in layers for _, st in _layer_rows(train, layer))
    if fine:
        keys.append(("degrouped", "de-grouped tokens"))
    fig, axes = _new_figure(10, 8 + 2 * fine, len(keys))
    fig.suptitle(f"{name}: routing balance per layer")
    cmap = matplotlib.colormaps["viridis"]
    for i, layer in enumerate(layers):
        pts = _layer_rows(train, layer)
        colour = cmap(i / max(len(layers) - 1, 1))
        for ax, (key, _) in zip(axes, keys):
            xy = [(s, st[key]) for s, st in pts if isinstance(st.get(key), (int, float))]
            _line(ax, [p[0] for p in xy], [p[1] for p in xy], color=colour, lw=1, label=layer)
    for ax, (key, label) in zip(axes, keys):
        ax.set_ylabel(label, fontsize=8)
        # The balanced value of the load curves; a fresh upcycle's (whole copies) of the de-grouped share.
        ax.axhline(0.0 if key == "degrouped" else 1.0, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    if len(layers) <= LEGEND_MAX_LAYERS:
        axes[0].legend(fontsize=7, ncols=2)
    else:
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, len(layers) - 1))
        bar = fig.colorbar(sm, ax=list(axes), label="MoE layer (depth order)", aspect=40)
        ticks = sorted({0, len(layers) // 2, len(layers) - 1})
        bar.set_ticks(ticks, labels=[layers[t] for t in ticks], fontsize=7)
    axes[-1].set_xlabel("step")
    return fig


def _save(fig, out_dir: str, filename: str) -> str:
    """Render to a temp file in out_dir, then rename over the target (atomic on one filesystem)."""
    final = os.path.join(out_dir, filename)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return final
