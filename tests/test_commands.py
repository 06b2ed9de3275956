"""The user commands are entry points of the installed package: each answers --help from its console script in a
fresh process; the old tools/ paths are shims over the same functions; nothing puts a folder on sys.path; the
benchmarks are a package run from the repository root."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent


def _help(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_every_declared_command_is_installed_and_answers_help():
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert installed == SCRIPTS, "pyproject.toml's [project.scripts] differ from the installed package: reinstall"
    with ThreadPoolExecutor(max_workers=4) as pool:  # --help imports no torch: seconds each
        done = dict(zip(SCRIPTS, pool.map(lambda name: _help([str(BIN / name)]), SCRIPTS)))
    for name, result in done.items():
        assert result.returncode == 0, f"{name} --help: {result.stderr[-2000:]}"
        assert result.stdout.startswith("usage: " + name), (name, result.stdout[:200])


@pytest.mark.parametrize("shim", sorted(p.name for p in (REPO_ROOT / "tools").glob("*.py")))
def test_tools_scripts_are_shims_over_package_commands(shim):
    text = (REPO_ROOT / "tools" / shim).read_text()
    assert len(text.splitlines()) <= 8, f"tools/{shim} holds logic; it belongs in the package"
    module = re.search(r"^from (flamingo_composer\.cli\.\w+) import main$", text, flags=re.M)
    assert module, f"tools/{shim} does not call a package command"
    assert any(value == f"{module.group(1)}:main" for value in SCRIPTS.values()), f"{module.group(1)} has no entry"


def test_old_tool_path_runs_the_same_command():
    result = _help([sys.executable, "tools/evaluate.py"])
    assert result.returncode == 0 and "--suite" in result.stdout


def test_no_code_puts_a_folder_on_sys_path():
    """Only the reference oracle does, for the reference's own scripts (they import their siblings)."""
    offenders = []
    for folder in ("flamingo_composer", "tools", "benchmarks", "tests"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"sys\.path\.(insert|append)\(", line) and path.name != "reference_oracle.py":
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}")
    assert not offenders, offenders


def test_benchmarks_run_as_modules_from_the_repository_root():
    result = _help([sys.executable, "-m", "benchmarks.gpu_bench"])
    assert result.returncode == 0 and "MFU" in result.stdout
