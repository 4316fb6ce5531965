"""Models named in a record and opened again later: a checkpoint's dense source, an adapter's base.

    config["upcycle"]["source"]["model"] = record_source("models/ttok")       # -> "/abs/path/models/ttok"
    spec = reopen_source(up["source"]["model"], up["source"]["fingerprint"],  # found, and checked
                         what="the dense source of runs/moe", near="runs/moe", hint="pass another: --baseline PATH")
    check_fingerprint("runs/other-base", want, what="the base of adapter runs/ad", recorded=raw_base)

A record names a model and its fingerprint (``sha256:`` over its weight files, ``Source.fingerprint``).
``record_source`` writes a local path absolute, so the record reopens the same model from any
directory; an alias (``smollm2-135m``) or a hub id is written as given, since it names the same
model anywhere. Whatever reopens a record checks the fingerprint: a model moved away or replaced
by another is one line naming the record (path and fingerprint) and what was found, never a
silent comparison with, or training on, another model.

Records written before paths were recorded absolute (``upcycle convert`` wrote ``--model`` as
typed) hold relative paths. They are looked up from the current directory (where the old code
looked), then from the directory holding the record and each of its parents (where the command
that wrote it most likely ran); the first candidate with the recorded fingerprint is the one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.io import one_line
from upcycle.models.sources import ALIASES, base_fingerprint

__all__ = ["check_fingerprint", "record_source", "reopen_source"]

log = logging.getLogger("upcycle")


def record_source(spec: str) -> str:
    """What to record for a model the user named: an existing local path made absolute; an alias or
    a hub id (or anything that is no local path) as given."""
    spec = str(spec)
    if spec in ALIASES:
        return spec
    path = Path(spec).expanduser()
    return os.path.abspath(path) if path.exists() else spec


def check_fingerprint(spec: str, want: str | None, *, what: str, recorded: str | None = None,
                      have: str | None = None, hint: str = "") -> None:
    """UpcycleError unless model ``spec`` has fingerprint ``want`` (None: nothing recorded to check).

    ``what`` names the record ("the base of adapter runs/ad"); ``recorded`` is the model it
    names, if it names one; ``have`` is ``spec``'s fingerprint when the caller has it already
    (hashing a large model takes seconds); ``hint`` ends the line (how to name the right model).
    """
    if not want:
        return
    have = have or base_fingerprint(spec)
    if have != want:
        named = f"{recorded} (fingerprint {want})" if recorded else f"a model with fingerprint {want}"
        raise UpcycleError(f"{what} is {named}, but {spec} has fingerprint {have}{hint}")


def reopen_source(recorded: str, fingerprint: str | None, *, what: str, near: str | None = None,
                  hint: str = "") -> str:
    """The model a record names, found and checked: a spec ``open_source`` takes (an absolute path, an alias
    or a hub id).

    ``recorded`` / ``fingerprint``: the record's model and fingerprint (None for records that have
    none: the model is then taken unchecked, with a warning line). ``what`` names the record in
    messages ("the dense source of runs/moe"). ``near``: the directory holding the record, where a
    relative (old) record is also looked up. ``hint`` ends an error line: how to name the right
    model instead. A missing model, or one whose fingerprint differs, is one UpcycleError naming
    the record and what was found.
    """
    recorded = str(recorded)
    candidates = _candidates(recorded, near)
    found: list[str] = []
    for spec in candidates:
        try:
            have = base_fingerprint(spec)
        except UpcycleError as e:
            if len(candidates) == 1 and not os.path.exists(spec):  # no such path, alias or hub repo
                raise UpcycleError(f"{what}, {recorded} (fingerprint {fingerprint or 'not recorded'}), is not "
                                   f"found: {e}{hint}") from None
            found.append(f"{spec} (unreadable: {one_line(e)})")
            continue
        if fingerprint is None or have == fingerprint:
            if fingerprint is None:
                log.warning("%s, %s, records no fingerprint: %s is taken unchecked", what, recorded, spec)
            elif spec != recorded:
                log.info("%s, recorded as %s, is %s (same fingerprint)", what, recorded, spec)
            return spec
        found.append(f"{spec} has fingerprint {have}")
    raise UpcycleError(f"{what} is {recorded} (fingerprint {fingerprint}), but {'; '.join(found)}{hint}")


def _candidates(recorded: str, near: str | None) -> list[str]:
    """Where ``recorded`` may be: itself when absolute, an alias or no local path (a hub id, or gone);
    else every existing place a relative record can mean (see the module docstring)."""
    path = Path(recorded).expanduser()
    if recorded in ALIASES or path.is_absolute():
        return [recorded]
    places = [Path.cwd()]
    if near is not None:
        home = Path(near).resolve()
        places += [home, *home.parents]
    out: list[str] = []
    for place in places:
        candidate = (place / path).resolve()
        # A record never names the directory holding it (a checkpoint named like its source, e.g. out/ttok).
        if candidate.exists() and str(candidate) not in out and (near is None or candidate != Path(near).resolve()):
            out.append(str(candidate))
    return out or [recorded]
