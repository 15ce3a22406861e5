"""The set-up a newcomer meets: the interpreter switch, the `flashcourse` command and `doctor`, and the packaging."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import flashcourse

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
    """``python -m flashcourse doctor`` in a fresh process: the same command as ``flashcourse doctor``."""
    r = subprocess.run([sys.executable, "-m", "flashcourse", "doctor"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    for word in ("python", "platform", "torch", "triton", "device", "triton mode", "course", "every chapter runs here",
                 "kernel", "verdict: OK"):
        assert word in r.stdout


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``flashcourse ARGV``, in this process."""
    from flashcourse.cli import main

    try:
        status = main(list(argv))
    except SystemExit as e:  # argparse's --help, --version and usage errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_plain_command_lists_the_commands_and_version_prints(capsys):
    status, out, _ = run_cli(capsys)
    assert status == 0 and all(name in out for name in ("doctor", "grade", "bench", "--version"))
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0 and out.strip() == f"flashcourse {flashcourse.__version__}"


def test_doctor_help_helps_and_unknown_options_are_refused(capsys):
    status, out, _ = run_cli(capsys, "doctor", "--help")
    assert status == 0 and "usage: flashcourse doctor" in out and "verdict" not in out
    status, out, err = run_cli(capsys, "doctor", "--frobnicate")
    assert status == 2 and "unrecognized arguments: --frobnicate" in err and "verdict" not in out


def test_cli_rejects_an_unknown_command(capsys):
    status, _, err = run_cli(capsys, "frobnicate")
    assert status == 2 and "invalid choice: 'frobnicate'" in err


def test_an_unexpected_error_is_one_line_not_a_traceback(monkeypatch, capsys):
    from flashcourse import cli, doctor

    monkeypatch.setattr(doctor, "report", lambda: 1 / 0)
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "flashcourse doctor: ZeroDivisionError: division by zero" in err
    assert "FLASHCOURSE_TRACEBACK=1 flashcourse doctor" in err
    monkeypatch.setenv("FLASHCOURSE_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["doctor"])


@pytest.mark.parametrize("system,has_triton,interpret,words", [
    ("Linux", True, True, ["every chapter runs here", "interpreter"]),
    ("Linux", True, False, ["every chapter runs here", "compiled for the GPU"]),
    ("Linux", False, True, ["chapters 00–03 and 06 (PyTorch) run here", "pip install triton"]),
    ("Darwin", False, True, ["chapters 00–03 and 06 (PyTorch) run here", "04, 05 and 07–10 need Triton",
                             "Linux only", "WSL2", "container", "Colab"]),
    ("Windows", False, True, ["chapters 00–03 and 06 (PyTorch) run here", "WSL2"]),
])
def test_doctor_says_what_runs_on_each_platform(system, has_triton, interpret, words):
    from flashcourse.doctor import course_support

    line = course_support(system, has_triton, interpret)
    for w in words:
        assert w in line, line


@pytest.mark.parametrize("system,release,machine,want", [
    ("Linux", "6.8.0-45-generic", "x86_64", "Linux 6.8.0-45-generic (x86_64)"),
    ("Linux", "5.15.153.1-microsoft-standard-WSL2", "x86_64", "Linux under WSL2 (x86_64)"),
    ("Windows", "11", "AMD64", "Windows 11 (AMD64)"),
])
def test_doctor_names_the_platform(system, release, machine, want):
    from flashcourse.doctor import platform_name

    assert platform_name(system, release, machine) == want


def test_without_triton_the_pytorch_chapters_and_doctor_run():
    """macOS and Windows have no Triton wheels: import flashcourse, the PyTorch code and doctor must still work."""
    r = run_python("import sys; sys.modules['triton'] = None\n"  # every `import triton` now fails
                   "import torch, flashcourse\n"
                   "q = torch.randn(1, 1, 5, 8)\n"
                   "assert flashcourse.tiled_attention(q, q, q).shape == q.shape\n"
                   "from flashcourse.cli import main\n"
                   "sys.exit(main(['doctor']))")
    assert r.returncode == 1, r.stderr
    assert "triton  not installed" in r.stdout and "verdict: PARTIAL" in r.stdout and "Traceback" not in r.stderr


def test_pyproject_matches_what_the_course_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # tomllib, used by these tests, is 3.11+
    # no Triton wheels outside Linux: there pip must still install the PyTorch part of the course
    assert "triton>=3.3; sys_platform == 'linux'" in project["dependencies"]


def test_environment_yml_installs_the_package_and_nothing_else():
    """The dependencies live in pyproject.toml only; the conda file brings Python and installs `.[dev]`."""
    yml = (ROOT / "environment.yml").read_text()
    assert re.findall(r"^\s+- pip:\n((?:\s+- .*\n?)*)", yml, flags=re.M)[0].split() == ["-", "-e", ".[dev]"]
    python = re.search(r"^\s+- python=(3\.\d+)$", yml, flags=re.M).group(1)
    assert tuple(map(int, python.split("."))) >= (3, 11)
    assert "tests/test_setup.py" in yml and "test_packaging" not in yml
    for build in ("whl/cpu", "whl/cu1"):
        assert f"PIP_EXTRA_INDEX_URL=https://download.pytorch.org/{build}" in yml


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = re.search(r"Run the tests.*?```bash\n\s*(.+?)\n\s*```", readme, flags=re.S).group(1).strip()
    assert command in ci
    assert "torch==2.13.0" in ci and 'pip install --quiet -e ".[dev]"' in ci


def test_readme_tells_the_routes_a_learner_needs():
    readme = (ROOT / "README.md").read_text()
    for words in ("conda env create -f environment.yml", "PIP_EXTRA_INDEX_URL", "--allow-root", "WSL2", "Colab",
                  '-m "not slow"', "-n auto", "-n 0", "<!-- TIME -->", "python -m flashcourse"):
        assert words in readme, words
