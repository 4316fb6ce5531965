"""The ``upcycle`` command: each subcommand parses its flags and calls one typed function.

    upcycle convert --layers 6 --experts 32 --out runs/smollm2-moe
    upcycle inspect runs/smollm2-moe
    upcycle eval runs/smollm2-moe --text play.txt --baseline
    upcycle generate runs/smollm2-moe --prompt "Hello"
    upcycle eval runs/qlora/checkpoints/last --text play.txt --baseline    # an adapter on its base, and the base
    upcycle export runs/smollm2-moe --format qwen2_moe --out runs/served
    upcycle train continued_pretraining max_steps=100
    upcycle plot runs/cpt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import typing
import warnings

from upcycle.config import RoutingName
from upcycle.errors import UpcycleError
from upcycle.moe.backends import EXPERT_BACKENDS
from upcycle.train.commands import add_plot_parser, add_train_parser
from upcycle.version import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,7,11, got {text!r}") from None


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 2GB or 500MB, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def _add_output_flags(p) -> None:
    """What every command that writes a checkpoint takes (convert, export)."""
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored precision (default: source's)")
    p.add_argument("--max-shard-size", type=_size, default="2GB", help="output shard size (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn dense MLPs into MoE layers", description=(
        "Turn the last N (or chosen) dense MLPs of a checkpoint into E-expert MoE layers: every expert a "
        "copy of the MLP, a fresh router. Streams tensor by tensor; writes a Hugging Face style directory."))
    p.add_argument("--model", default="smollm2-135m",
                   help="HF model dir, .gguf file, hub repo id, or alias (default: smollm2-135m, embedded)")
    p.add_argument("--out", help="output directory (default: runs/<model>-L<layers>-E<experts>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", type=int, help="upcycle the last N MLPs")
    g.add_argument("--layer-ids", type=_int_list, help="upcycle these layers, e.g. 3,7,11")
    p.add_argument("--experts", type=int, default=8, help="copies of the MLP per MoE layer (default 8)")
    p.add_argument("--granularity", type=int, default=1, help=(
        "fine-grained upcycling: cut each copy into G segments, E*G experts of width F/G "
        "(default 1: every expert a whole copy)"))
    p.add_argument("--routing", choices=list(typing.get_args(RoutingName)), default="topk")
    p.add_argument("--top-k", type=int, default=None, help=(
        "experts per token; a multiple of G (default 2, or G with --granularity G: one copy's worth, the dense "
        "model's FLOPs)"))
    p.add_argument("--no-normalize", action="store_true", help="top-K: keep raw softmax combine weights")
    p.add_argument("--weight-scaling", action="store_true", help=(
        "with --no-normalize (softmax-then-top-K, He et al. 2024): multiply the experts' down projections by E/K, "
        "so that a uniform router gives the dense output (close to it at t=0, not exact)"))
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="top-K: cap each expert at ceil(c*n*K/E) tokens and drop the rest (default: dropless)")
    p.add_argument("--capacity", type=float, default=None, help="expert choice: capacity factor C (default 2.0)")
    p.add_argument("--ec-group", choices=["position", "sequence"], default=None,
                   help="expert choice routing group: position (causal, default) or sequence (not causal)")
    p.add_argument("--aux-loss-weight", type=float, default=0.01, help="Switch load-balancing loss weight")
    p.add_argument("--z-loss-weight", type=float, default=0.001, help="router z-loss weight")
    p.add_argument("--expert-noise", type=float, default=0.0, help="std of Gaussian noise added to each expert")
    p.add_argument("--reinit-ratio", type=float, default=0.0, help="Drop-Upcycling: fraction of FFN units re-drawn")
    p.add_argument("--router-std", type=float, default=0.02, help="router init std (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--permute-copies", action="store_true",
                   help="with --granularity: each copy's neurons in its own seeded random order before it is cut")
    shared = p.add_mutually_exclusive_group()
    shared.add_argument("--shared-fraction", type=float, default=None,
                        help="this share of each MLP's neurons becomes one always-on shared expert (0 < f < 1)")
    shared.add_argument("--shared-neurons", type=int, default=None, help="the shared expert's width, in neurons")
    p.add_argument("--shared-selection", choices=["activation", "random"], default=None, help=(
        "which neurons are shared: activation (default: the largest mean contribution on --calibration text) "
        "or random (seeded)"))
    p.add_argument("--calibration", default=None,
                   help="text for --shared-selection activation: shakespeare (default, embedded) or a UTF-8 file")
    p.add_argument("--calibration-tokens", type=int, default=None, help="calibration tokens (default 4096)")
    _add_output_flags(p)
    p.set_defaults(func=_convert)


# MoEConfig routing fields -> the convert flag that sets each.
_ROUTING_FLAGS = {"top_k": "--top-k", "normalize_topk": "--no-normalize", "topk_capacity_factor": "--capacity-factor",
                  "capacity": "--capacity", "ec_group": "--ec-group"}


def _convert(a) -> None:
    from upcycle.config import ConvertConfig, MoEConfig
    from upcycle.moe.schemes import scheme_class
    from upcycle.surgery.convert import convert

    if a.layers is None and a.layer_ids is None:
        raise UpcycleError("give --layers N or --layer-ids I,J,...")
    # A flag of another routing scheme would be silently ignored: refuse it instead.
    given = {"top_k": a.top_k, "normalize_topk": a.no_normalize or None, "topk_capacity_factor": a.capacity_factor,
             "capacity": a.capacity, "ec_group": a.ec_group}
    own = scheme_class(a.routing).fields
    for field, value in given.items():
        if value is not None and field not in own:
            hint = " (top-K's capacity is --capacity-factor)" if field == "capacity" else ""
            raise UpcycleError(f"{_ROUTING_FLAGS[field]} does not apply to --routing {a.routing}{hint}")
    shared = a.shared_fraction is not None or a.shared_neurons is not None
    for flag, value in (("--shared-selection", a.shared_selection), ("--calibration", a.calibration),
                        ("--calibration-tokens", a.calibration_tokens)):
        if value is not None and not shared:
            raise UpcycleError(f"{flag} applies to a shared expert: add --shared-fraction or --shared-neurons")
    if a.granularity < 1:
        raise UpcycleError(f"--granularity must be at least 1, got {a.granularity}")
    G = a.granularity
    tag = (f"G{G}" if G > 1 else "") + ("S" if shared else "")
    out = a.out or os.path.join(
        "runs", f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', os.path.basename(a.model.rstrip('/')))}"
                f"-L{a.layers if a.layers is not None else '-'.join(map(str, a.layer_ids))}-E{a.experts}{tag}")
    # --experts counts copies of the MLP; the config counts experts as the router sees them (E*G).
    top_k = a.top_k if a.top_k is not None else (G if G > 1 else 2)
    moe = MoEConfig(num_experts=a.experts * G, granularity=G, routing=a.routing, top_k=top_k,
                    normalize_topk=not a.no_normalize,
                    topk_capacity_factor=a.capacity_factor, capacity=2.0 if a.capacity is None else a.capacity,
                    ec_group=a.ec_group or "position",
                    aux_loss_weight=a.aux_loss_weight, z_loss_weight=a.z_loss_weight)
    cfg = ConvertConfig(out=out, model=a.model, layers=a.layers, layer_ids=a.layer_ids, moe=moe,
                        expert_noise=a.expert_noise, reinit_ratio=a.reinit_ratio, router_std=a.router_std,
                        seed=a.seed, dtype=a.dtype, overwrite=a.overwrite, max_shard_size=a.max_shard_size,
                        progress=not a.no_progress, permute_copies=a.permute_copies, weight_scaling=a.weight_scaling,
                        shared_fraction=a.shared_fraction, shared_neurons=a.shared_neurons,
                        shared_selection=a.shared_selection or "activation", calibration=a.calibration or "shakespeare",
                        calibration_tokens=4096 if a.calibration_tokens is None else a.calibration_tokens)
    r = convert(cfg)
    w = r.widths
    summary = {"out": r.out, "layer_ids": r.layer_ids, "experts": r.num_experts, "gigabytes": r.bytes_written / 1e9,
               "seconds": r.seconds, "mb_per_s": r.mb_per_s, "peak_rss_mb": r.peak_rss_mb,
               "copies": a.experts, "granularity": G, "top_k": top_k, "expert_ffn_size": w.expert,
               "shared_ffn_size": w.shared, "padding_neurons": w.padding, "shared_score_share": r.shared_score_share}
    if a.json:
        print(json.dumps(summary))
        return
    experts = f"{r.num_experts} experts"
    if G > 1 or w.shared:
        experts = (f"{a.experts} copies x {G} segments = {r.num_experts} experts of {w.expert} neurons"
                   + (f" ({w.padding} zero per copy)" if w.padding else "")
                   + (f" + a shared expert of {w.shared}" if w.shared else "") + f", top-{top_k}")
    print(f"wrote {r.out}: layers {','.join(map(str, r.layer_ids))} -> {experts}, "
          f"{r.bytes_written / 1e9:.2f} GB in {r.seconds:.1f} s ({r.mb_per_s:.0f} MB/s), "
          f"peak memory {r.peak_rss_mb:.0f} MB")
    if r.shared_score_share:
        shares = list(r.shared_score_share.values())
        print(f"shared expert: the {w.shared} of {w.dense} neurons most active on the calibration text, holding "
              f"{min(shares):.1%}-{max(shares):.1%} of the MLPs' mean output contribution")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a checkpoint or an adapter",
                       description="Architecture, MoE layers, experts, routing, parameters, dtype, size on disk; "
                                   "for an adapter directory: its targets, rank, parameters and base.")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)


def _inspect(a) -> None:
    from upcycle.models.esft import describe_esft
    from upcycle.models.loader import checkpoint_kind
    from upcycle.models.upcycled import describe

    if not os.path.exists(a.path):
        raise UpcycleError(f"checkpoint not found: {a.path}")
    if not os.path.isdir(a.path):
        raise UpcycleError(f"inspect takes a checkpoint or adapter directory; {a.path} is not a directory")
    kind = checkpoint_kind(a.path)  # a directory that is neither a model nor an adapter: one line saying so
    if kind == "adapter":
        from upcycle.adapters import describe_adapter

        info = describe_adapter(a.path)
    elif kind == "esft":
        info = describe_esft(a.path)
    else:
        info = describe(a.path)
    if a.json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        if v is None:
            continue
        if k.endswith("params") or k.endswith("per_token"):
            v = f"{v:,} ({v / 1e6:.1f}M)"
        elif k == "size_on_disk_bytes":
            k, v = "size_on_disk", f"{v / 1e9:.2f} GB"
        elif isinstance(v, list):
            v = ",".join(map(str, v))
        print(f"{k:<24} {v}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file", description=(
        "Perplexity of a model on a UTF-8 text: an upcycled checkpoint, an adapter (on its recorded base; a QLoRA "
        "adapter on its base quantised as trained), an ESFT checkpoint, or any source convert accepts."))
    p.add_argument("path", help="upcycled checkpoint dir, adapter dir, ESFT checkpoint, or any source convert accepts")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--baseline", nargs="?", const="@source", default=None,
                   help="also evaluate this model (given without a value: an upcycled checkpoint's dense source, "
                        "an adapter's or ESFT checkpoint's base)")
    _add_adapter_flags(p)
    _add_runtime_flags(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)


def _add_adapter_flags(p) -> None:
    p.add_argument("--base", default=None,
                   help="an adapter's (or ESFT checkpoint's) base (default: the one it records; the fingerprint is "
                        "checked either way)")
    p.add_argument("--merge", action="store_true",
                   help="an adapter: fold it into the full-precision base (what upcycle merge writes) instead of "
                        "attaching it unmerged (a QLoRA adapter: on its NF4 base)")


def _add_runtime_flags(p) -> None:
    p.add_argument("--experts-backend", default="auto", choices=EXPERT_BACKENDS)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")


def _device(a) -> str:
    import torch

    return a.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _eval(a) -> None:
    from upcycle.inference import eval_plan, format_table, perplexity, read_text, routing_table
    from upcycle.models.loader import load_model_and_tokenizer

    # Checked before any model loads: on a large model a late error costs minutes.
    for flag, value, least in (("--seq-len", a.seq_len, 2), ("--batch-size", a.batch_size, 1),
                               ("--max-tokens", a.max_tokens, 2)):
        if value is not None and value < least:
            raise UpcycleError(f"{flag} must be at least {least}, got {value}")
    text = read_text(a.text)
    if not text.strip():  # train refuses it too: the perplexity of whitespace is no measure of a model
        raise UpcycleError(f"{a.text} is empty: no text to evaluate")
    runs = eval_plan(a.path, a.baseline, base=a.base, merge=a.merge)
    results = []
    for spec, kw, label in runs:
        model, tok = load_model_and_tokenizer(spec, a.experts_backend, _device(a), **kw)
        adapted = getattr(model, "upcycle_adapted", None)
        label = adapted.label if adapted is not None else label
        r = perplexity(model, tok, text, a.max_tokens, a.seq_len, a.batch_size, progress=not a.no_progress)
        results.append({"model": spec, "kind": label, **r})
        if adapted is not None:
            results[-1].update(base=adapted.base, base_quantization=adapted.quantization)
        del model
    diff = None
    if len(results) == 2:  # same tokeniser and windows, so the logits line up
        diff = (results[0]["first_logits"] - results[1]["first_logits"]).abs().max().item()
    for r in results:
        del r["first_logits"]
    if a.json:
        print(json.dumps({"results": results, "max_abs_logit_diff": diff} if diff is not None else results[0], indent=2))
        return
    print(format_table(["model", "tokens", "perplexity", "nll/token", "seconds"],
                       [[f"{r['model']} ({r['kind']})" if r["kind"] else r["model"], r["tokens"], f"{r['ppl']:.3f}",
                         f"{r['nll']:.4f}", f"{r['seconds']:.1f}"] for r in results]))
    if diff is not None:
        print(f"max |logit difference| on the first {results[0]['first_window']}-token window: {diff:.3g}")
    for r in results:
        if "base" in r:
            print(f"{r['model']}: base {r['base']}, {r['base_quantization'] or 'full precision'}")
    for r in results:
        if r["routing"]:
            print(f"\nrouting of {r['model']} over the evaluated tokens:\n{routing_table(r['routing'])}")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text", description=(
        "Generate a reply (chat template when the tokenizer has one) with an upcycled checkpoint, an adapter (on "
        "its recorded base; a QLoRA adapter on its base quantised as trained), an ESFT checkpoint or any source."))
    p.add_argument("path", help="upcycled checkpoint dir, adapter dir, ESFT checkpoint, or any source convert accepts")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true")
    _add_adapter_flags(p)
    _add_runtime_flags(p)
    p.set_defaults(func=_generate)


def _generate(a) -> None:
    from upcycle.inference import generate
    from upcycle.models.loader import load_model_and_tokenizer

    if not a.prompt.strip():
        raise UpcycleError("--prompt is empty")
    if a.max_new_tokens < 1:
        raise UpcycleError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    if not a.temperature >= 0:
        raise UpcycleError(f"--temperature must be >= 0, got {a.temperature}")
    model, tok = load_model_and_tokenizer(a.path, a.experts_backend, _device(a), base=a.base, merge=a.merge)
    if getattr(model, "upcycle_adapted", None) is not None:  # which model answers: on stderr, the reply alone on stdout
        logging.getLogger("upcycle").info(model.upcycle_adapted.describe())
    print(generate(model, tok, a.prompt, a.max_new_tokens, a.temperature, not a.no_chat_template, a.seed))


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter (or an ESFT checkpoint) into its base model", description=(
        "Fold a LoRA adapter into its base model and write a full checkpoint (an upcycled base gives an "
        "upcycled checkpoint); an ESFT checkpoint (a run that trained a subset of the experts) has its "
        "experts written back into the base. The base is the one recorded unless --base is given."))
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors), or an "
                                   "ESFT checkpoint (esft_config.json + esft_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--base", default=None, help="base checkpoint (default: the one the adapter records)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_merge)


def _merge(a) -> None:
    from upcycle.adapters import merge_command

    r = merge_command(a.adapter, a.out, base=a.base, progress=not a.no_progress)
    if a.json:
        print(json.dumps(r))
        return
    kind = "upcycled" if r["upcycled"] else "dense"
    if "merged_experts" in r:
        print(f"wrote {r['out']}: {r['merged_experts']} trained experts of {r['merged_modules']} MoE layers "
              f"written into the base {r['base']}")
        return
    print(f"wrote {r['out']}: {r['merged_modules']} LoRA modules merged into the {kind} base {r['base']}")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a stock MoE checkpoint (Qwen2-MoE, Qwen3-MoE, Mixtral) or a GGUF file",
                       description=(
        "Write an upcycled checkpoint (or a LoRA adapter, merged into its base) as a stock transformers MoE "
        "checkpoint that engines load without upcycle, or as one GGUF file that llama.cpp runs. What the format "
        "cannot express exactly is refused before anything is written; afterwards it prints which engines serve "
        "the result exactly and which must not be used."))
    p.add_argument("src", help="upcycled checkpoint dir (e.g. runs/cpt/checkpoints/step-000300) or adapter dir")
    p.add_argument("--format", default="auto", choices=["auto", "qwen2_moe", "qwen3_moe", "mixtral", "gguf"],
                   help="auto: qwen3_moe for a Qwen3 base, mixtral when every layer is MoE, else qwen2_moe")
    p.add_argument("--out", required=True, help="output directory (--format gguf: the .gguf file)")
    p.add_argument("--all-moe", action="store_true",
                   help="every dense layer becomes E identical experts (exact; costs (E-1)x their MLP weights): "
                        "for SGLang and llama.cpp's llama architecture, which need MoE in every layer")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="--format gguf: tensor type (default f16 for a 16-bit source, else f32)")
    _add_output_flags(p)
    p.set_defaults(func=_export)


def _export(a) -> None:
    from upcycle.surgery.export import ExportConfig, export

    r = export(ExportConfig(src=a.src, out=a.out, format=a.format, all_moe=a.all_moe, dtype=a.dtype,
                            outtype=a.outtype, max_shard_size=a.max_shard_size, overwrite=a.overwrite,
                            progress=not a.no_progress))
    if a.json:
        print(json.dumps({"out": r.out, "format": r.format, "architecture": r.architecture,
                          "moe_layers": r.moe_layers, "copied_layers": r.copied_layers,
                          "gigabytes": r.bytes_written / 1e9, "seconds": r.seconds, "engines": r.engines}))
        return
    copied = f" ({','.join(map(str, r.copied_layers))} as identical copies)" if r.copied_layers else ""
    print(f"wrote {r.out}: {r.architecture} ({r.format}), MoE layers {','.join(map(str, r.moe_layers))}{copied}, "
          f"{r.bytes_written / 1e9:.2f} GB in {r.seconds:.1f} s")
    for line in r.engines:
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="upcycle", description="Dense LLM checkpoints -> Mixture-of-Experts.")
    parser.add_argument("--version", action="version", version=f"upcycle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_convert, _add_inspect, _add_eval, _add_generate, _add_merge, _add_export, add_train_parser,
                add_plot_parser):
        add(sub)
    return parser


class _StderrLines(logging.Handler):
    """One ``upcycle: ...`` line per record on the *current* stderr (an in-process caller may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"upcycle: {record.getMessage()}", file=sys.stderr)


def _say_info_lines() -> None:
    """The package's info lines (``logging.getLogger("upcycle")``) on stderr, like warnings; records
    still propagate, so a caller's own logging setup sees them too."""
    log = logging.getLogger("upcycle")
    if not any(isinstance(h, _StderrLines) for h in log.handlers):
        log.addHandler(_StderrLines())
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # argparse cannot take flags between positionals: flags first
        argv = ["train", *[x for x in argv[1:] if x.startswith("-")], *[x for x in argv[1:] if not x.startswith("-")]]
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, *_a, **_k: f"upcycle: warning: {msg}\n"
    _say_info_lines()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise on stderr
        args.func(args)
    except UpcycleError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process fails alike: say it once
            print(f"upcycle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # convert and merge clean up after themselves; train keeps the checkpoints it completed
        print("upcycle: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
