"""The README as data for the tests that hold it to the code: its code blocks, the shell lines
in them, the commands it runs, and the log lines it quotes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The README's prose with its line breaks undone, for phrases that wrap.
PROSE = " ".join(README.split())


def code_blocks() -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def block_with(text: str) -> str:
    (found,) = [block for block in code_blocks() if text in block]
    return found


def shell_lines(block: str) -> list[str]:
    """The block's lines, with `\\`-continued lines joined and a `$ ` prompt dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.removeprefix("$ ") for line in joined.splitlines()]


def readme_command(command: str) -> str:
    """The one line of the README that runs `syncd COMMAND` by hand where the install put it."""
    (line,) = [
        line
        for block in code_blocks()
        for line in shell_lines(block)
        if f"/opt/syncd/systemd/syncd-as-unit {command}" in line
    ]
    return line


def log_example(start: str) -> str:
    """The log line the README quotes (under `journalctl`) that starts with `start`."""
    (line,) = [
        line
        for line in block_with("$ journalctl -u syncd -f").splitlines()
        if line.startswith(start)
    ]
    return line


def as_quoted(log: str, outputs_dir: Path) -> list[str]:
    """A daemon's log lines as the README quotes them: the message alone (no journal priority,
    no time and level), `outputs_dir` shown as /outputs."""
    lines = []
    for line in log.splitlines():
        line = re.sub(r"^<\d>|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \w+\s+", "", line)
        lines.append(line.replace(str(outputs_dir), "/outputs"))
    return lines
