"""Extract the commands documented in README.md, CONTRIBUTING.md, docs/ and examples/README.md.

Fenced ```sh blocks and inline `code` spans that start with a known program become `Command`s
(one per simple command: pipelines, `&&` and `;` are split, continuation lines joined, comments
and redirections dropped, `export`/`VAR=value` prefixes kept as the command's environment).
Placeholders are normalized: `<anything>` becomes `PLACEHOLDER`, and `...` marks elided arguments.
A usage synopsis (`[-o json]`, `(--view NAME \\| --all)`) expands into its variants.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "examples" / "README.md"]
PROGRAMS = {"kubectl", "helm", "make", "marketplacedb", "docker", "psql", "createdb", "python", ".venv/bin/pytest"}
SHELL_LANGS = {"sh", "bash", "shell", "console"}
_FENCE = re.compile(r"^( *)```([\w-]*)\s*$")
_ANGLE = re.compile(r"<[A-Za-z][\w.\- ]*>")
_SEPARATORS = {"|", "||", "&&", ";", "&"}


@dataclasses.dataclass(frozen=True)
class Block:
    path: pathlib.Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    inline: bool = False

    @property
    def elided(self) -> bool:
        return "..." in self.argv

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def blocks(path: pathlib.Path) -> list[Block]:
    out: list[Block] = []
    lang: str | None = None
    buffer: list[str] = []
    start = indent = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = _FENCE.match(line)
        if fence and lang is None:
            lang, buffer, start, indent = fence.group(2), [], number, len(fence.group(1))
        elif fence and lang is not None:
            out.append(Block(path, start, lang, "\n".join(buffer)))
            lang = None
        elif lang is not None:
            buffer.append(line[indent:] if not line[:indent].strip() else line)
    return out


def all_blocks() -> list[Block]:
    return [block for path in DOCS for block in blocks(path)]


def _simple_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(_ANGLE.sub("PLACEHOLDER", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in _SEPARATORS:
            commands.append([])
        elif token in (">", ">>", "<", "2>"):
            skip_next = True  # the redirection's target
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _command(where: str, words: list[str], exported: dict[str, str], inline: bool) -> Command | None:
    env = dict(exported)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words and words[0] == "do":
        words = words[1:]
    if not words or words[0] not in PROGRAMS:
        return None
    return Command(where, tuple(words), tuple(sorted(env.items())), inline)


def shell_commands(block: Block) -> list[Command]:
    text = block.text.replace("\\\n", " ")
    exported: dict[str, str] = {}
    out = []
    for offset, line in enumerate(text.splitlines()):
        for words in _simple_commands(line):
            if words[0] == "export":
                exported.update(w.split("=", 1) for w in words[1:] if "=" in w)  # type: ignore[misc]
                continue
            if words[0] in ("for", "done"):
                continue
            command = _command(f"{block.where}+{offset + 1}", words, exported, inline=False)
            if command is not None:
                out.append(command)
    return out


def inline_commands(path: pathlib.Path) -> list[Command]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    out = []
    for match in re.finditer(r"`([^`\n]+)`", text):
        span = match.group(1)
        if span.split(" ", 1)[0] not in PROGRAMS or " " not in span:
            continue
        line = text.count("\n", 0, match.start()) + 1
        where = f"{path.relative_to(ROOT)}:{line}"
        for variant in synopsis_variants(span):
            for words in _simple_commands(variant):
                command = _command(where, words, {}, inline=True)
                if command is not None:
                    out.append(command)
    return out


def synopsis_variants(span: str) -> list[str]:
    """`a [-o json] (--x | --y)` -> every combination: optional parts in or out, each alternative."""
    span = span.replace("\\|", "|")
    parts = re.split(r"(\[[^\]]*\]|\([^)]*\|[^)]*\))", span)
    choices: list[list[str]] = []
    for part in parts:
        if part.startswith("[") and part.endswith("]"):
            choices.append(["", part[1:-1]])
        elif part.startswith("(") and "|" in part:
            choices.append([alt.strip() for alt in part[1:-1].split("|")])
        else:
            choices.append([part])
    return [" ".join(" ".join(combo).split()) for combo in itertools.product(*choices)]


def all_commands() -> list[Command]:
    out: list[Command] = []
    for path in DOCS:
        for block in blocks(path):
            if block.lang in SHELL_LANGS:
                out.extend(shell_commands(block))
        out.extend(inline_commands(path))
    return out
