"""The runbooks' commands, read from the docs themselves and run as real processes.

In ``docs/*.md`` a fenced ```` ```bash ```` block right after a line ``<!-- runbook: STEP -->``
is step ``STEP`` of that document: the commands an operator types, with shell variables
(``"$NODE"``, ``"$RUN"``) for what differs per site. The block after ``<!-- runbook:
variables -->`` sets those variables to the document's example values, one ``NAME=value  #
what it is`` a line. The docs are the one place the commands live: the deployment test runs
these blocks with its own values, so a command the docs get wrong fails the test.

Tests import nothing from siblings (``--import-mode=importlib``): ``tests/conftest.py`` hands
this module over as the ``runbook`` fixture.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["DOCS", "ROOT", "VARIABLES", "argvs", "command", "environment", "run_step", "start_step", "steps",
           "used_variables", "variables"]  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
VARIABLES = "variables"  # the marker of the block that sets the example values
_MARK = re.compile(r"^<!--\s*runbook:\s*([a-z0-9][a-z0-9-]*)\s*-->\s*$")
_ASSIGN = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S*)(?:\s+#.*)?$")
_USE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


class RunbookError(ValueError):
    """A marked block that is missing, malformed or names a step twice."""


def _doc(doc: str | Path) -> Path:
    path = Path(doc)
    return path if path.is_absolute() or path.exists() else DOCS / path


@functools.cache
def _blocks(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    blocks: dict[str, str] = {}
    for i, line in enumerate(lines):
        mark = _MARK.match(line.strip())
        if not mark:
            continue
        name = mark.group(1)
        if i + 1 >= len(lines) or lines[i + 1].strip() != "```bash":
            raise RunbookError(f"{path.name}:{i + 1}: `runbook: {name}` must be followed by a ```bash block")
        try:
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        except StopIteration:
            raise RunbookError(f"{path.name}:{i + 2}: the ```bash block of step {name} never ends") from None
        if name in blocks:
            raise RunbookError(f"{path.name}:{i + 1}: step {name} is marked twice")
        blocks[name] = "\n".join(lines[i + 2 : end]) + "\n"
    return blocks


def steps(doc: str | Path) -> dict[str, str]:
    """Every marked step of ``doc`` (a path, or a file name under ``docs/``): name -> the block's text."""
    return {k: v for k, v in _blocks(_doc(doc)).items() if k != VARIABLES}


def variables(doc: str | Path) -> dict[str, str]:
    """The variables ``doc`` documents, with its example values (its ``runbook: variables`` block)."""
    text = _blocks(_doc(doc)).get(VARIABLES)
    if text is None:
        raise RunbookError(f"{_doc(doc).name}: no `<!-- runbook: variables -->` block")
    out = {}
    for line in text.splitlines():
        if line.strip():
            m = _ASSIGN.match(line.strip())
            if not m:
                raise RunbookError(f"{_doc(doc).name}: not a NAME=value line in the variables block: {line!r}")
            out[m.group(1)] = m.group(2)
    return out


def used_variables(text: str) -> set[str]:
    """The shell variables a block expands (comments included: a comment may name one too)."""
    return set(_USE.findall(text))


def _code_and_comment(line: str) -> tuple[str, str]:
    """``line`` split before its trailing ``# comment`` (a ``#`` outside quotes, after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def command(doc: str | Path, step: str, append: Sequence[str] = ()) -> str:
    """Step ``step``'s text, with ``append`` (quoted) added to its last command: test-only flags."""
    try:
        text = steps(doc)[step]
    except KeyError:
        raise RunbookError(f"{_doc(doc).name}: no step {step!r} (marked: {', '.join(steps(doc))})") from None
    if not append:
        return text
    lines = text.rstrip("\n").split("\n")
    last = max(i for i, line in enumerate(lines) if _code_and_comment(line)[0].strip())
    code, _ = _code_and_comment(lines[last])
    lines[last] = f"{code} {shlex.join(append)}"
    return "\n".join(lines) + "\n"


@functools.cache
def _shim() -> Path:
    """A ``fedmart`` on PATH that runs this checkout's code with this interpreter (not whatever is installed)."""
    d = Path(tempfile.mkdtemp(prefix="fedmart-runbook-"))
    atexit.register(shutil.rmtree, d, True)
    exe = d / "fedmart"
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fedmart "$@"\n')
    exe.chmod(0o755)
    return d


def environment(values: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a step runs in: ours, ``fedmart`` from this checkout first on PATH, and ``values``."""
    path = os.pathsep.join([str(_shim()), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
            **(values or {})}  # fmt: skip


def _bash(script: str) -> list[str]:
    return ["bash", "-euo", "pipefail", "-c", script]


def run_step(
    doc: str | Path,
    step: str,
    env: Mapping[str, str],
    cwd: str | Path,
    *,
    append: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run step ``step`` of ``doc`` to its end in ``cwd`` with the variables ``env``; output captured."""
    return subprocess.run(
        _bash(command(doc, step, append)), cwd=cwd, env=environment(env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def start_step(
    doc: str | Path, step: str, env: Mapping[str, str], cwd: str | Path, log: Path, *, append: Sequence[str] = ()
) -> subprocess.Popen:
    """Start a long-running step (a coordinator, a node, a server) in a session of its own, output to ``log``."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            _bash(command(doc, step, append)), cwd=cwd, env=environment(env), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def argvs(doc: str | Path, step: str, env: Mapping[str, str]) -> list[list[str]]:
    """The argument lists of every ``fedmart`` call in the step, as bash would pass them; nothing runs."""
    probe = 'fedmart() { printf "%s\\0" "$#" "$@"; }\n' + command(doc, step)
    raw = subprocess.run(_bash(probe), env=environment(env), capture_output=True, check=True).stdout
    fields, out = raw.decode().split("\0")[:-1], []
    while fields:
        n = int(fields[0])
        out.append(fields[1 : 1 + n])
        fields = fields[1 + n :]
    return out
