"""The docs cannot drift from the code: every `unconfuse ...` command line in README.md and docs/*.md (fenced code
blocks) parses with the CLI's own parser: its subcommand, flags and recipe names exist, and a --config it names is a
file of this repository or a shipped config."""
import re
import shlex
from pathlib import Path

import pytest

from unconfuse.cli.commands import build_parser
from unconfuse.train.config import ConfigError, resolve_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def command_lines() -> list[tuple[str, str]]:
    """(``file:line``, command) for every line of a fenced block that runs ``unconfuse``."""
    found = []
    for page in PAGES:
        fenced, lines = False, page.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            text = line.strip().removeprefix("$ ")
            if fenced and text.startswith("unconfuse "):
                following = iter(lines[number:])
                while text.endswith("\\"):  # a command continued on the next line
                    text = text[:-1] + " " + next(following).strip()
                found.append((f"{page.relative_to(REPO)}:{number}", text))
    return found


def argv_of(command: str) -> list[str]:
    """The arguments of a documented command: its comment dropped, optional ``[...]`` parts left out."""
    command = re.sub(r"\s+#.*$", "", command)
    command = re.split(r"\s(?:>|\||&&|;)\s", command)[0]  # the shell's part: a redirection, a pipe, a next command
    while re.search(r"\[[^\[\]]*\]", command):
        command = re.sub(r"\s*\[[^\[\]]*\]", "", command)
    return [arg for arg in shlex.split(command)[1:] if arg != "..."]


def test_the_docs_show_commands():
    assert len(command_lines()) > 30


@pytest.mark.parametrize("where, command", command_lines(), ids=[w for w, _ in command_lines()])
def test_every_documented_command_parses(where, command, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = argv_of(command)
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse")
    assert all("=" in item and not item.startswith("-") for item in extra), f"{where}: unknown arguments {extra}"
    config = getattr(args, "config", None)
    if config and not any(ch in config for ch in "<>") and config.upper() != config:
        try:
            resolve_config(config)
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")
        assert resolve_config(config).is_file(), f"{where}: --config {config} is no file"


def test_the_check_has_teeth():
    with pytest.raises(SystemExit):
        build_parser().parse_known_args(argv_of("unconfuse train mllm_sfd --config configs/mllm_sft/tiny.yaml"))
    assert argv_of("unconfuse cv mllm_sft --folds 5 [--launch X] [key=value ...]  # note") == ["cv", "mllm_sft", "--folds", "5"]
