"""The README and docs/ stay true to the repository: every `endoflow` command the README shows answers `--help`,
every `make` target it names exists, every relative link in README.md and docs/**/*.md resolves, and the README
stays short enough to be read."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from pipelines.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200

FENCED_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# a subcommand word, or alternatives written as `segment|adapt`
COMMAND_WORD = re.compile(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*")
MAKE_TARGET = re.compile(r"[A-Za-z0-9_.-]+")
MAKEFILE_RULE = re.compile(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?!=)", re.MULTILINE)
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def code_texts(markdown: str) -> list[str]:
    """The text of every fenced block and of every inline code span outside them."""
    return FENCED_BLOCK.findall(markdown) + CODE_SPAN.findall(FENCED_BLOCK.sub("", markdown))


def shell_words(text: str) -> list[list[str]]:
    """Each line of a code text as whitespace-separated words, a `#` comment cut off."""
    return [line.split("#", 1)[0].split() for line in text.splitlines()]


def endoflow_commands(markdown: str) -> list[tuple[str, ...]]:
    """Every `endoflow` subcommand path shown in code: the words after `endoflow` up to the first option or
    argument, with `a|b` alternatives expanded into one path each."""
    paths: set[tuple[str, ...]] = set()
    for text in code_texts(markdown):
        for words in shell_words(text):
            for i, word in enumerate(words):
                if word != "endoflow" and not word.endswith("/endoflow"):
                    continue
                path = list(itertools.takewhile(COMMAND_WORD.fullmatch, words[i + 1 :]))
                paths.update(itertools.product(*(w.split("|") for w in path)))
    return sorted(paths)


def make_targets(markdown: str) -> list[str]:
    """Every target of a `make ...` shown in code (variable assignments such as `ENSEMBLE=2` skipped)."""
    targets: set[str] = set()
    for text in code_texts(markdown):
        for words in shell_words(text):
            for i, word in enumerate(words):
                if word != "make":
                    continue
                for arg in words[i + 1 :]:
                    if "=" in arg:
                        continue
                    if not MAKE_TARGET.fullmatch(arg):
                        break
                    targets.add(arg)
    return sorted(targets)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {target for rule in MAKEFILE_RULE.findall(text) for target in rule.split()}


def relative_links() -> list[tuple[str, str]]:
    """(markdown file, link) for every relative link outside code blocks in README.md and docs/**/*.md."""
    files = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    links = []
    for path in files:
        for target in MARKDOWN_LINK.findall(FENCED_BLOCK.sub("", path.read_text())):
            if not URL_SCHEME.match(target) and not target.startswith("#"):
                links.append((str(path.relative_to(ROOT)), target))
    return links


README_TEXT = README.read_text()


def test_readme_is_short():
    lines = len(README_TEXT.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_readme_shows_commands_and_targets():
    assert endoflow_commands(README_TEXT), "no `endoflow` command found in README.md code"
    assert make_targets(README_TEXT), "no `make` target found in README.md code"


@pytest.mark.parametrize("words", endoflow_commands(README_TEXT), ids=" ".join)
def test_readme_endoflow_command_answers_help(words):
    # click answers --help before it rejects extra arguments, so first walk the words down the command tree
    command = typer.main.get_command(app)
    for depth, word in enumerate(words):
        shown = " ".join(words[: depth + 1])
        subcommands = getattr(command, "commands", None)
        assert subcommands is not None, f"`endoflow {shown}`: `{command.name}` has no subcommands"
        command = subcommands.get(word)
        assert command is not None, f"`endoflow {shown}` is in README.md but is not a command"
    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, f"`endoflow {' '.join(words)} --help` exited {result.exit_code}:\n{result.output}"


@pytest.mark.parametrize("target", make_targets(README_TEXT))
def test_readme_make_target_exists(target):
    assert target in makefile_targets(), f"`make {target}` is in README.md but not in the Makefile"


@pytest.mark.parametrize(("source", "link"), relative_links(), ids=lambda value: value)
def test_relative_link_resolves(source, link):
    resolved = (ROOT / source).parent / link.split("#", 1)[0]
    assert resolved.exists(), f"{source} links to {link}, which does not exist"
