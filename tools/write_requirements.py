"""Write requirements.txt, the file a Hugging Face Space installs, from constraints.txt.

    python tools/write_requirements.py      # tools/refresh-constraints.sh runs it too

constraints.txt stays the one source of truth for versions. requirements.txt pins every
package the app needs at run time (pyproject.toml's dependencies and all they pull in,
dev tools left out) to its constraints.txt version, and torch to the version the install
command names (.ci/run). The dependency graph is read from the installed packages'
metadata, so run it in an environment installed with the constraints (the refresh script's
new one, or the README's install); tests/test_install.py regenerates it and compares.

The Space's builder mounts requirements.txt alone and runs `pip install -r` on it before it
copies the repository, so the file can name neither another file (`-c constraints.txt`) nor
the project itself (`.`): it holds plain pins. app.py runs from the repository root, where
`trainer` and `ui` import as they are.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# `pip freeze` leaves out the installer's own tools, so constraints.txt does not pin them;
# pip brings a current one where a package asks for it (tensorboard asks for setuptools).
FREEZE_OMITS = {"pip", "setuptools", "wheel", "distribute"}

HEADER = """\
# The runtime dependencies of Atelier, pinned to the versions CI tested: what a Hugging Face
# Space installs (it reads this file, not pyproject.toml). Generated from constraints.txt by
# tools/write_requirements.py (tools/refresh-constraints.sh runs it): do not edit by hand.
#
# torch=={torch}: on a Space (Linux, PyPI) this is the CUDA build a GPU Space needs; CI tests
# the CPU build of the same version. The NVIDIA libraries the CUDA build pulls in are pinned
# by that build itself, so they are not listed here.
#
# The project itself is not installed from here: the Space's builder runs `pip install -r`
# before it copies the repository, so a `.` line would fail the build. app.py runs from the
# repository root, where `trainer` and `ui` import as they are.
"""


def constraint_pins(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """constraints.txt as {canonical name: (name as written, version)}."""
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = (name, version)
    return pins


def torch_version(root: Path = ROOT) -> str:
    """The torch version the install command names (.ci/run, the README's command)."""
    match = re.search(r"pip install torch==(\S+)", (root / ".ci" / "run").read_text())
    if not match:
        raise SystemExit(".ci/run does not name torch==VERSION in its install command")
    return match.group(1)


def runtime_requirements(root: Path = ROOT) -> list[Requirement]:
    import tomllib
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def closure(start: list[Requirement], *, skip: set[str] = frozenset()) -> set[str]:
    """The canonical names of `start` and everything they require, from the installed
    packages' metadata (markers evaluated here, extras followed); `skip` is not descended."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in start if _applies(r, frozenset())]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        if name in skip:
            continue
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{requirement.name} is not installed here: run this in an "
                             "environment installed with the constraints.") from None
        for text in requires:
            child = Requirement(text)
            if _applies(child, extras):
                todo.append((child, frozenset(child.extras)))
    return names


def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": e}) for e in {"", *extras})


def requirements_text(root: Path = ROOT) -> str:
    pins = constraint_pins(root)
    torch = torch_version(root)
    start = runtime_requirements(root)
    ours = closure(start, skip={"torch"})  # all of it must be pinned
    unpinned = sorted(ours - pins.keys() - FREEZE_OMITS - {"torch"})
    if unpinned:
        raise SystemExit(f"not pinned in constraints.txt: {', '.join(unpinned)}; run "
                         "tools/refresh-constraints.sh")
    # torch's own requirements where constraints.txt pins them (the CPU build's); the CUDA
    # build's extra libraries are pinned by that build.
    from_torch = closure([Requirement("torch")]) & pins.keys()
    names = sorted((ours & pins.keys()) | from_torch, key=lambda n: pins[n][0].lower())
    lines = [f"torch=={torch}"] + [f"{pins[n][0]}=={pins[n][1]}" for n in names]
    return HEADER.format(torch=torch) + "\n".join(lines) + "\n"


def main() -> int:
    text = requirements_text()
    (ROOT / "requirements.txt").write_text(text)
    print(f"requirements.txt: {sum(1 for l in text.splitlines() if l and l[0] != '#')} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
