"""Every shell command the README shows is one that works: the Quick start is what .ci/run runs,
each `fastlora ...` line parses (its flags exist, its values have the right types), each pip
extra exists, each script or folder named is there. (tests/test_readme.py runs the Python.)"""
import re
import shlex
from pathlib import Path

import pytest

from fastlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _commands(text):
    """Every command of the ```bash blocks in `text`: comments dropped, `a && b` split in two."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command = []
            for word in words + ["&&"]:
                if word == "&&":
                    if command:
                        out.append(command)
                    command = []
                else:
                    command.append(word)
    return out


COMMANDS = _commands(README)
# and the pip commands quoted in the prose (`pip install -e '.[test,torch]'`)
PIP = [c for c in COMMANDS + [shlex.split(m) for m in re.findall(r"`(pip install [^`]*)`", README)]
       if c[:2] == ["pip", "install"]]
QUICK_START = _commands(README.split("## Quick start", 1)[1].split("\n## ", 1)[0])
CI_COMMANDS = {" ".join(c) for c in _commands("```bash\n" + CI + "```")}


def _ids(commands):
    return [" ".join(c)[:60] for c in commands]


def test_the_quick_start_is_what_ci_runs():
    assert QUICK_START[0][:2] == ["git", "clone"] and QUICK_START[1][0] == "cd"  # CI starts from a checkout
    for command in QUICK_START[2:]:
        assert " ".join(command) in CI_COMMANDS, f"{' '.join(command)!r} is not run by .ci/run"
    url = re.search(r'^Source = "(.*)"$', PYPROJECT, re.M).group(1)
    assert QUICK_START[0][2] == url  # the clone address is the one pyproject publishes


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "fastlora"],
                         ids=_ids([c for c in COMMANDS if c[0] == "fastlora"]))
def test_each_fastlora_command_parses(argv):
    args = build_parser().parse_args(argv[1:])  # argparse exits on an unknown flag or a bad value
    assert args.command == argv[1]


@pytest.mark.parametrize("argv", PIP, ids=_ids(PIP))
def test_each_pip_extra_exists(argv):
    section = PYPROJECT.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([a-z]+) = \[", section, re.M))
    named = [e for word in argv for group in re.findall(r"\[([a-z,]+)\]", word) for e in group.split(",")]
    assert set(named) <= extras, (named, extras)


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] in ("python", "python3") and c[1] != "-m"
                                  or c[:3] == ["python", "-m", "pytest"]],
                         ids=_ids([c for c in COMMANDS if c[0] in ("python", "python3") and c[1] != "-m"
                                   or c[:3] == ["python", "-m", "pytest"]]))
def test_each_script_or_folder_named_exists(argv):
    paths = [word for word in argv[1:] if not word.startswith("-") and word not in ("pytest", "venv", ".venv")]
    for path in paths:
        assert (ROOT / path).exists(), path
