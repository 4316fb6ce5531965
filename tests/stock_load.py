"""Loading an ``upcycle export`` in a process that never imports upcycle, and comparing it with ``upcycle.load``
(DESIGN.md invariant 7): shared by tests/test_export.py and tests/test_export_fine_grained.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch
from tolerances import TOLERANCES

import upcycle

F32 = TOLERANCES[torch.float32]

# Runs in a fresh interpreter: transformers alone, and it says so if upcycle got imported anyway.
STOCK = r"""
import json, logging, sys, warnings
import torch
import transformers
from transformers import AutoModelForCausalLM
logged = []
handler = logging.Handler(); handler.emit = lambda r: logged.append(r.getMessage())
transformers.logging.get_logger().addHandler(handler)
transformers.logging.set_verbosity_warning()
path, ids_file, out_file = sys.argv[1:]
ids = torch.load(ids_file)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
model.eval()
logits = model(input_ids=ids).logits
greedy = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6,
                        do_sample=False, pad_token_id=0)
params = dict(model.named_parameters())
# What transformers itself writes for this model: the names and shapes a stock checkpoint has.
model.save_pretrained(out_file + ".resaved")
from safetensors import safe_open
resaved = {}
for f in sorted(__import__("glob").glob(out_file + ".resaved/*.safetensors")):
    with safe_open(f, "pt") as h:
        resaved.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
torch.save({"logits": logits, "greedy": greedy, "class": type(model).__name__,
            "upcycle_imported": any(m.split(".")[0] in ("upcycle", "upcycle_kernels") for m in sys.modules),
            "missing": {k: params[k].numel() for k in info["missing_keys"]},
            "unexpected": sorted(info["unexpected_keys"]), "mismatched": sorted(info["mismatched_keys"]),
            "resaved": resaved, "messages": logged + [str(w.message) for w in caught]}, out_file)
"""


def stock_run(path, ids, tmp_path):
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", STOCK, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "got.pt")],
                   check=True, env=env, cwd=tmp_path)
    return torch.load(tmp_path / "got.pt")


def exported_tensors(folder) -> dict[str, tuple]:
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    return out


def assert_stock_equals_upcycle(src, exported, tmp_path, tol=F32, cls="Qwen2MoeForCausalLM", dense=None):
    """A process that never imports upcycle loads ``exported`` as ``cls``: exactly the tensors transformers' own
    save_pretrained writes (none of size 0), nothing missing but zero-element ones, and the logits (``tol``) and
    6 greedy tokens of ``upcycle.load(src)`` (float32). ``dense``: the dense original of a fresh upcycle (t=0),
    loaded by transformers here, which must give the same logits and greedy tokens too."""
    ids = torch.randint(5, 110, (2, 12), generator=torch.Generator().manual_seed(0))
    got = stock_run(exported, ids, tmp_path)
    assert not got["upcycle_imported"] and got["class"] == cls
    written = exported_tensors(exported)
    assert all(math.prod(shape) > 0 for shape in written.values()), "a zero-size tensor was written"
    # Exactly the names and shapes transformers' own save_pretrained writes, less its zero-size tensors.
    assert written == {k: v for k, v in got["resaved"].items() if math.prod(v) > 0}
    # Missing on load: only Qwen2-MoE's size-0 shared expert, which has no element to fill.
    assert not got["unexpected"] and not got["mismatched"], got
    assert all(n == 0 and ".shared_expert." in k for k, n in got["missing"].items()), got["missing"]
    # Messages allowed: torch's note on those zero-element tensors, and transformers' load report of them.
    bad = [m for m in got["messages"] if "zero-element" not in m
           and not ("LOAD REPORT" in m
                    and all(".shared_expert." in line for line in m.splitlines() if "MISSING |" in line))]
    assert not bad, bad
    ours = upcycle.load(str(src), experts_backend="loop")
    torch.testing.assert_close(got["logits"], ours(input_ids=ids).logits, **tol)
    want = ours.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    assert got["greedy"].tolist() == want.tolist()
    if dense is not None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
        torch.testing.assert_close(got["logits"], base(input_ids=ids).logits, **tol)
        want = base.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        assert got["greedy"].tolist() == want.tolist()
