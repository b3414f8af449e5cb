"""The install is reproducible: constraints.txt pins every dependency, each pin lies inside
pyproject.toml's range, and the README and CI install with it the same way."""
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, where the pins were resolved

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'pip install torch==2.13.0 && pip install -e ".[dev]" -c constraints.txt'


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in
            project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_pinned_inside_its_range():
    pinned = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        if name == "torch":  # named by the install command (CPU build here, CUDA elsewhere)
            assert name not in pinned
            continue
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{name}=={pinned[name]} is outside pyproject's {requirement.specifier}")


def test_pins_are_exact_and_listed_once():
    lines = [l for l in (ROOT / "constraints.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", l) for l in lines), lines
    assert len({canonicalize_name(l.split("==")[0]) for l in lines}) == len(lines)


def test_the_readme_and_ci_install_the_same_way():
    assert INSTALL in (ROOT / "README.md").read_text()
    assert INSTALL in (ROOT / ".ci" / "run").read_text()
