"""The Dockerfile (no Docker engine here): hadolint passes, what it installs agrees with pyproject.toml, README's
build/run commands match it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the tested version)


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` in one RUN command."""
    installs = []
    for command in re.split(r"&&|;", run):
        words = shlex.split(command)
        if len(words) >= 2 and words[0] in ("pip", "pip3") and words[1] == "install":
            installs.append(words[2:])
    return installs


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_matches_the_pinned_torch_and_python():
    pins = {Requirement(r).name: Requirement(r) for r in _pyproject()["project"]["dependencies"]}
    (base,) = [args for word, args in _instructions() if word == "ARG" and args.startswith("BASE_IMAGE=")]
    match = re.fullmatch(r"BASE_IMAGE=mosaicml/pytorch:(?P<torch>[\d.]+)_cu\d+-python(?P<python>[\d.]+)-\S+", base)
    assert match, base
    assert match.group("torch") in pins["torch"].specifier, (base, str(pins["torch"]))
    assert match.group("python") in SpecifierSet(_pyproject()["project"]["requires-python"])
    assert [args for word, args in _instructions() if word == "FROM"] == ["${BASE_IMAGE}"]


def test_every_package_the_image_installs_comes_from_pyproject():
    """`pip install .` installs pyproject's pins; any other package named in the Dockerfile must be pinned alike."""
    pins = {Requirement(r).name.lower(): Requirement(r) for r in _pyproject()["project"]["dependencies"]}
    targets = []
    for word, args in _instructions():
        if word == "RUN":
            for install in _pip_installs(args):
                targets += [t for t in install if not t.startswith("-")]
    assert "." in targets, "the image must install this package (and with it pyproject's pinned dependencies)"
    for target in targets:
        if target in (".", "./") or target.startswith((".[", "./[")):
            extras = set(re.findall(r"\[(.*)\]", target)[0].split(",")) if "[" in target else set()
            assert extras <= set(_pyproject()["project"].get("optional-dependencies", {})), target
            continue
        requirement = Requirement(target)
        assert requirement.name.lower() in pins, f"{target}: not a dependency in pyproject.toml"
        assert requirement.specifier == pins[requirement.name.lower()].specifier, (target, str(pins[requirement.name]))


def test_readme_build_and_run_commands_match_the_image():
    readme = (REPO_ROOT / "README.md").read_text()
    header = DOCKERFILE.read_text()
    for text in (readme, header):
        assert "docker build -t flamingo-composer ." in text
        run = re.search(
            r"docker run --gpus all --ipc=host (?:-v \S+ )*flamingo-composer composer train\.py (\S+)", text
        )
        assert run, "docker run ... --gpus all --ipc=host ... flamingo-composer composer train.py RECIPE"
        assert (REPO_ROOT / run.group(1)).is_file(), run.group(1)
    (cmd,) = [args for word, args in _instructions() if word == "CMD"]
    assert all((REPO_ROOT / word).is_file() for word in re.findall(r'"(yamls/[^"]+)"', cmd))
