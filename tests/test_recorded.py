"""Models named in a record and reopened (``upcycle.models.recorded``): absolute records, the fingerprint
check, records from before paths were absolute, aliases and hub ids.

    python -m pytest -q tests/test_recorded.py
"""

from __future__ import annotations

import logging
import shutil

import pytest
from conftest import make_dense, needs_smollm2

from upcycle.errors import UpcycleError
from upcycle.models.recorded import check_fingerprint, record_source, reopen_source
from upcycle.models.sources import base_fingerprint

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two different tiny models and their fingerprints."""
    root = tmp_path_factory.mktemp("recorded")
    paths = [root / "m0", root / "m1"]
    for seed, path in enumerate(paths):
        make_dense("llama", path, seed=seed)
    return paths, [base_fingerprint(str(p)) for p in paths]


def test_local_paths_are_recorded_absolute_aliases_and_hub_ids_as_given(two, monkeypatch):
    (m0, _), _ = two
    monkeypatch.chdir(m0.parent)
    assert record_source("m0") == str(m0) and record_source("./m0/") == str(m0)
    assert record_source("smollm2-135m") == "smollm2-135m"
    assert record_source("some-org/some-model") == "some-org/some-model"


def test_a_record_reopens_its_model_from_anywhere_or_names_what_it_found(two, tmp_path, monkeypatch):
    (m0, m1), (f0, f1) = two
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(m0, model)
    assert reopen_source(str(model), f0, what="the base of X") == str(model)
    # Replaced by another model: the record (path and fingerprint) and what is there now, in one line.
    shutil.rmtree(model)
    shutil.copytree(m1, model)
    with pytest.raises(UpcycleError) as e:
        reopen_source(str(model), f0, what="the base of X", hint="; pass --base")
    assert str(e.value) == f"the base of X is {model} (fingerprint {f0}), but {model} has fingerprint {f1}; pass --base"
    # Moved away: the record, and that nothing is there.
    shutil.rmtree(model)
    with pytest.raises(UpcycleError, match=rf"^the base of X, {model} \(fingerprint {f0}\), is not found: model not "
                                           r"found: .*; pass --base$"):
        reopen_source(str(model), f0, what="the base of X", hint="; pass --base")
    # A model the user names instead is checked against the same record.
    check_fingerprint(str(m0), f0, what="the base of X", recorded=str(model))
    with pytest.raises(UpcycleError, match=rf"^the base of X is {model} \(fingerprint {f0}\), but {m1} has fingerprint "
                                           rf"{f1}$"):
        check_fingerprint(str(m1), f0, what="the base of X", recorded=str(model))


def test_old_relative_records_are_found_by_their_fingerprint(two, tmp_path, monkeypatch, caplog):
    # convert ran in project/ with --model m and wrote project/runs/ckpt; the record says "m". From other/, which
    # holds another model named m, the recorded one is still found: beside the checkpoint's parents.
    (m0, m1), (f0, f1) = two
    project, other = tmp_path / "project", tmp_path / "other"
    shutil.copytree(m0, project / "m")
    shutil.copytree(m1, other / "m")
    near = project / "runs" / "ckpt"
    near.mkdir(parents=True)
    monkeypatch.chdir(other)
    with caplog.at_level(logging.INFO, logger="upcycle"):
        assert reopen_source("m", f0, what="the source of ckpt", near=str(near)) == str(project / "m")
    assert f"recorded as m, is {project / 'm'} (same fingerprint)" in caplog.text
    monkeypatch.chdir(project)  # where the old code looked first: still the first choice when it matches
    assert reopen_source("m", f0, what="the source of ckpt", near=str(near)) == str(project / "m")
    # No candidate has the recorded fingerprint: every one is named with what it has.
    monkeypatch.chdir(other)
    shutil.rmtree(project / "m")
    shutil.copytree(m1, project / "m")
    with pytest.raises(UpcycleError) as e:
        reopen_source("m", f0, what="the source of ckpt", near=str(near))
    assert str(e.value) == (f"the source of ckpt is m (fingerprint {f0}), but {other / 'm'} has fingerprint {f1}; "
                            f"{project / 'm'} has fingerprint {f1}")
    # A checkpoint named like its source (out/m) is never taken for it.
    assert reopen_source("m", f1, what="x", near=str(tmp_path / "out" / "m")) == str(other / "m")


def test_records_without_a_fingerprint_are_taken_with_a_warning(two, caplog):
    (m0, _), _ = two
    with caplog.at_level(logging.WARNING, logger="upcycle"):
        assert reopen_source(str(m0), None, what="the base of an old adapter") == str(m0)
    assert "records no fingerprint" in caplog.text


def test_hub_ids_are_recorded_as_given_and_checked(two, monkeypatch):
    import huggingface_hub

    (m0, _), (f0, f1) = two
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(m0))  # no network in tests
    assert reopen_source("some-org/tiny", f0, what="the source of X") == "some-org/tiny"
    with pytest.raises(UpcycleError, match=rf"^the source of X is some-org/tiny \(fingerprint {f1}\), but "
                                           rf"some-org/tiny has fingerprint {f0}$"):
        reopen_source("some-org/tiny", f1, what="the source of X")


@pytest.mark.slow
@needs_smollm2
def test_the_embedded_alias_is_checked_too(two):
    _, (f0, _) = two
    have = base_fingerprint("smollm2-135m")
    assert reopen_source("smollm2-135m", have, what="the source of X") == "smollm2-135m"
    with pytest.raises(UpcycleError, match=rf"is smollm2-135m \(fingerprint {f0}\), but smollm2-135m has fingerprint"):
        reopen_source("smollm2-135m", f0, what="the source of X")
