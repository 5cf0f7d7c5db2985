"""README's first lines are what a new user runs: the two commands, the install paragraph, and
examples that work as printed (issue 19: a `sweep perf` example that did not fit, a test command
that skipped the page tests, no word on Python or a virtualenv)."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from sweep.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_block() -> tuple[list[str], str]:
    m = re.match(r"```bash\n(.*?)\n```\n\n", README, flags=re.S)
    assert m, "README must start with the bash block of the two commands"
    return m.group(1).splitlines(), README[m.end():]


def test_readme_starts_with_the_two_commands_then_how_to_install():
    lines, rest = _first_block()
    assert len(lines) == 2
    run, test = lines
    assert "sweep run studies/lt-pareto.toml" in run and test.endswith("python -m pytest -q")
    apt = re.match(r"apt-get update && apt-get install -y ([\w -]+?) && ", test)  # a fresh machine has no package lists
    assert apt, "the test command starts by installing the system packages the tests use"
    # the packages .ci/run installs: PostgreSQL for the multi-host tests, Chromium for the page tests
    ci = (ROOT / ".ci" / "run").read_text()
    ci_pkgs = {pkg for group in re.findall(r"need\+=\(([^)]*)\)", ci) for pkg in group.split()}
    assert set(apt.group(1).split()) == ci_pkgs == {"postgresql", "chromium", "chromium-driver"}
    assert '".[test,postgres]"' in test
    install = rest.split("\n\n")[0]
    assert install.startswith("**Install.**")
    for needle in ("Python 3.11", "venv", "root", "sudo"):
        assert needle in install, needle
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def _perf_examples() -> list[str]:
    return [ln.split("#")[0].strip() for ln in README.splitlines() if ln.startswith("sweep perf --model")]


@pytest.mark.parametrize("line", _perf_examples())
def test_readme_perf_examples_run_as_printed(capsys, line):
    """Each `sweep perf --model ...` line of README, its optional [...] flags included, exits 0."""
    argv = shlex.split(line.replace("[", " ").replace("]", " "))
    assert argv[0] == "sweep"
    rc = main(argv[1:])
    err = capsys.readouterr().err
    assert rc == 0, f"{line}: {err}"


def test_the_interactive_page_is_the_first_thing_to_look_at():
    section = README[README.index("## Looking at a study"):]
    first = next(ln for ln in section.splitlines()[1:] if ln.startswith("- "))
    assert first.startswith("- Interactive page"), first
    assert "interactive page" in README[:README.index("# ttsweep")]
