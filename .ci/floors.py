"""The declared lower bounds of upcycle's dependencies, as exact pins (what `make test-oldest` installs).

    python .ci/floors.py > floors.txt          # triton==3.6.0 ; platform_system == 'Linux' ...
    python .ci/floors.py --check               # exit 1 unless the installed versions are those pins

Read from pyproject.toml (``[project] dependencies`` and the ``test`` extra), so the versions
tested cannot drift from the ranges declared. ``name>=X`` becomes ``name==X``, markers kept; a
dependency without a lower bound stays as declared (pip takes the newest). torch is left out:
the caller pins the one build it tests (the comment at torch in pyproject.toml says why).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

SKIP = {"torch"}
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(v: str) -> tuple[int, ...]:
    """3.0 and 3.0.0 alike: the release numbers without trailing zeros."""
    parts = [int(p) for p in re.match(r"[0-9]+(\.[0-9]+)*", v).group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def floors(pyproject: Path = PYPROJECT) -> list[tuple[str, str | None, str]]:
    """(name, lower bound or None, marker or "") for every declared dependency but torch."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
    out = []
    for req in reqs:
        spec, _, marker = req.partition(";")
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$", spec)
        name, bounds = m.group(1), m.group(3)
        if _canonical(name) in SKIP:
            continue
        low = re.search(r">=\s*([^,\s]+)", bounds)
        out.append((name, low.group(1) if low else None, marker.strip()))
    return out


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        bad = 0
        for name, low, marker in floors():
            if low is None:
                continue
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                have = None
            if have is None and marker:  # e.g. triton off Linux: the marker excluded it
                continue
            ok = have is not None and _release(have) == _release(low)
            bad += not ok
            print(f"{name:16} floor {low:10} installed {have or '-':10} {'ok' if ok else 'MISMATCH'}")
        return 1 if bad else 0
    if argv:
        print("usage: python .ci/floors.py [--check]", file=sys.stderr)
        return 2
    for name, low, marker in floors():
        print(f"{name}=={low}" if low else name, f"; {marker}" if marker else "", sep="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
