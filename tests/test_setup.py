"""The set-up a newcomer meets: the interpreter switch, `flashcourse doctor`, and consistent dependency lists."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_cpu_machine = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def run_python(code: str, **env):
    """Run code in a fresh interpreter with TRITON_INTERPRET unset unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, cwd=ROOT)


@needs_cpu_machine
def test_import_turns_the_interpreter_on():
    r = run_python("import os, flashcourse; print(os.environ['TRITON_INTERPRET'], flashcourse.INTERPRET)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True"]


@needs_cpu_machine
def test_triton_imported_first_is_explained():
    r = run_python("import triton, flashcourse")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "import flashcourse first" in r.stderr and "TRITON_INTERPRET=1" in r.stderr


def test_triton_first_is_fine_when_the_variable_is_set():
    r = run_python("import triton, flashcourse", TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr


def test_doctor_launches_a_kernel_and_gives_a_verdict():
    r = subprocess.run([sys.executable, "-m", "flashcourse.cli", "doctor"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    for word in ("python", "torch", "triton", "device", "triton mode", "kernel", "verdict: OK"):
        assert word in r.stdout


def test_cli_rejects_an_unknown_command():
    r = subprocess.run([sys.executable, "-m", "flashcourse.cli", "frobnicate"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def _names(requirements):
    return {re.split(r"[<>=\[ ]", r.strip())[0].lower() for r in requirements}


def test_environment_yml_lists_what_pyproject_lists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"] + project["optional-dependencies"]["dev"])
    pip_section = (ROOT / "environment.yml").read_text().split("- pip:")[1]
    listed = _names(line for line in re.findall(r"^\s+- (\S.*)$", pip_section, flags=re.M) if not line.startswith("-e"))
    assert listed == wanted
    assert "-e .[dev]" in (ROOT / "environment.yml").read_text()


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = re.search(r"Run the tests.*?```bash\n\s*(.+?)\n\s*```", readme, flags=re.S).group(1).strip()
    assert command in ci
    assert "torch==2.13.0" in ci and 'pip install --quiet -e ".[dev]"' in ci
