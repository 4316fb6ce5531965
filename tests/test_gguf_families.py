"""GGUF sources read exactly as transformers reads them, family by family, against the Hugging Face original.

    make test-engines                                        # or, with llama.cpp's tree unpacked:
    python -m pytest -q -m engines tests/test_gguf_families.py

Every case of tests/gguf_zoo.py is a tiny random HF model written to GGUF by llama.cpp's own
``convert_hf_to_gguf.py`` (f32). An ``exact`` case: the dense model upcycle reads equals transformers'
GGUF load tensor for tensor, its logits equal the original's (fp32), and a fresh top-K upcycle of the
GGUF gives those logits again. A ``refused`` case: one line naming the cause, nothing written, and
the refusal is needed (transformers' own read of that file differs from the original, or fails).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import llama_cpp_dir
from gguf_zoo import CASES, build_zoo
from tolerances import TOLERANCES

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main
from upcycle.errors import UpcycleError
from upcycle.models.sources import open_source

pytestmark = pytest.mark.engines

EXACT = [name for name, case in CASES.items() if case.expect == "exact"]
REFUSED = [name for name, case in CASES.items() if case.expect == "refused"]
# Ids below 200: inside both tokenizers' vocabularies (tests/gguf_zoo.py), long enough to cross Gemma's
# 8-token sliding window and Gemma 3's global layer.
IDS = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("gguf-zoo"), llama_cpp_dir())


def _converted(zoo, name):
    built = zoo[name]
    assert built.gguf is not None, f"llama.cpp's converter failed on {name}: {built.error}"
    return built


def _transformers_gguf_load(gguf):
    from transformers import AutoModelForCausalLM

    # An absolute gguf_file: transformers prefers a same-named file in the working directory.
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=str(gguf), dtype=torch.float32).eval()


def _config_fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("dtype", "_name_or_path", "quantization_config")}


@pytest.mark.parametrize("name", EXACT)
def test_exact_family(zoo, name, tmp_path):
    built = _converted(zoo, name)
    ref = _transformers_gguf_load(built.gguf)
    with open_source(str(built.gguf)) as src:
        assert src.kind == "gguf" and src.unmapped == []
        # An untied original keeps its own lm_head (GPT-2's arrives through the processor's parsed_parameters).
        assert ("lm_head.weight" in src.tensor_names()) == (not built.model.config.tie_word_embeddings)
        for n in src.tensor_names():  # metadata promises what get_tensor delivers
            assert src.tensor_info(n) == (tuple(src.get_tensor(n).shape), torch.float32), n
        dense = src.load_dense_model()
    assert type(dense) is type(ref) and _config_fields(dense.config) == _config_fields(ref.config)
    got, want = dense.state_dict(), ref.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:  # upcycle's read = transformers' GGUF load, bit for bit
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():
        logits = dense(IDS).logits
        assert torch.equal(logits, ref(IDS).logits)
        # = the original. Gemma's and Nemotron's norms come back as (1 + w) - 1, an ulp off w, but the model
        # computes 1 + w from it, which is exact: the logits stay within fp32 tolerance (here: equal).
        torch.testing.assert_close(logits, built.model(IDS).logits, **TOLERANCES[torch.float32])

    out = tmp_path / "moe"  # a fresh top-K upcycle of the GGUF is that dense model
    cfg = ConvertConfig(out=str(out), model=str(built.gguf), layers=2, progress=False,
                        moe=MoEConfig(num_experts=4, top_k=2))
    if built.case.upcycles:  # an architecture upcycle refuses whatever the source format
        with pytest.raises(UpcycleError, match=built.case.upcycles):
            upcycle.convert(cfg)
        assert not out.exists()
        return
    upcycle.convert(cfg)
    moe = upcycle.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, logits, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", REFUSED)
def test_refused_family(zoo, name):
    built = _converted(zoo, name)
    with pytest.raises(UpcycleError) as info:
        open_source(str(built.gguf))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"cannot read {built.gguf} exactly: ") and built.case.reason in msg, msg
    # The refusal is needed: transformers' own read of this file is not the original.
    try:
        ref = _transformers_gguf_load(built.gguf)
    except Exception as exc:  # it fails outright (an unsupported family, or its config does not fit)
        assert isinstance(exc, (ValueError, RuntimeError)), exc
        return
    with torch.no_grad():
        diff = (ref(IDS).logits - built.model(IDS).logits).abs().max().item()
    assert diff > 1e-4, f"transformers reads {name} as the original (max |diff| {diff:.2e}): the refusal is not needed"


def _with_tensor(src, out, name, array):
    """``src`` rewritten by gguf-py with one more tensor."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        is_array = f.types[0] == gguf.GGUFValueType.ARRAY
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if is_array else None)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_falcon_output_weight_must_be_the_embeddings(zoo, tmp_path):
    """transformers ties Falcon's lm_head to the embeddings whatever the file holds: a copy reads, a different
    output.weight is refused (transformers would silently use one of the two)."""
    import gguf

    built = _converted(zoo, "falcon")
    embed = np.array(next(t for t in gguf.GGUFReader(str(built.gguf)).tensors if t.name == "token_embd.weight").data)
    same = _with_tensor(built.gguf, tmp_path / "same.gguf", "output.weight", embed)
    with open_source(str(same)) as src:
        assert "lm_head.weight" not in src.tensor_names() and src.config.tie_word_embeddings
        with torch.no_grad():
            torch.testing.assert_close(src.load_dense_model()(IDS).logits, built.model(IDS).logits,
                                       **TOLERANCES[torch.float32])
    other = _with_tensor(built.gguf, tmp_path / "other.gguf", "output.weight", embed + 1)
    with pytest.raises(UpcycleError, match="its output.weight differs from token_embd.weight"):
        open_source(str(other))


def test_cli_refuses_in_one_line_and_writes_nothing(zoo, tmp_path, capsys):
    built = _converted(zoo, "gemma2-softcapping")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", "--model", str(built.gguf), "--out", str(out), "--layers", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("upcycle: error: cannot read ") and "softcapping" in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []
