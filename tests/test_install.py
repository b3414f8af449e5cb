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


def requirements_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("write_requirements",
                                                  ROOT / "tools" / "write_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requirement_lines() -> list[str]:
    return [l for l in (ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]


def test_requirements_txt_pins_the_runtime_to_the_constraints():
    # What a Space installs is what CI tested: regenerated from constraints.txt, it is the file.
    assert (ROOT / "requirements.txt").read_text() == requirements_tool().requirements_text(), (
        "requirements.txt is out of step with constraints.txt: python tools/write_requirements.py")
    pinned = pins()
    listed = {}
    for line in requirement_lines():
        # The Space's builder mounts this file alone before copying the repo: no other file
        # (-c, -r) and no local path can be named in it.
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), line
        name, version = line.split("==")
        listed[canonicalize_name(name)] = version
    assert listed.pop("torch") == re.search(r"torch==(\S+)", INSTALL).group(1)
    assert all(pinned[name] == version for name, version in listed.items())
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {canonicalize_name(Requirement(r).name) for r in runtime} - {"torch"} <= listed.keys()
    assert not {"pytest", "pytest-timeout", "playwright"} & listed.keys()  # dev tools stay out


def test_the_space_runs_the_tested_python_and_gradio():
    front = (ROOT / "README.md").read_text().split("---")[1]
    # The Space installs gradio==sdk_version beside requirements.txt: one version, or no build.
    assert re.search(r"^sdk_version: (\S+)$", front, re.M).group(1) == pins()["gradio"]
    tested = re.search(r"with Python (\d+\.\d+)", (ROOT / "constraints.txt").read_text()).group(1)
    assert re.search(r"^python_version: \"?([\d.]+)\"?$", front, re.M).group(1) == tested
