"""The README's promises, checked: every command in its fenced bash/sh blocks and inline code (and in docs/*.md)
calls a script that exists with flags that script accepts, the page stays short, the Performance section carries
measured numbers, and every relative link in README.md, zoo/README.md and docs/*.md points at a file in the
repository.

Run: python -m pytest -q tests/test_readme.py
"""

import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN = [README, ROOT / "zoo" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_commands(text: str) -> list[str]:
    """Lines of the ```bash / ```sh blocks, backslash continuations joined, `NAME="..."` assignments expanded."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            m = re.fullmatch(r'(\w+)="([^"]*)"', line)
            if m:
                env[m[1]] = m[2]
                continue
            for name, value in env.items():
                line = line.replace(f"${name}", value)
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def inline_commands(text: str) -> list[str]:
    """Inline code spans that are whole commands: `python X.py ...`, `torchrun ... X.py ...`, `bash runs/X.sh ...`."""
    spans = re.findall(r"`([^`\n]+)`", text)
    return [s for s in spans if re.match(r"(\w+=\S+ )*(python |torchrun |bash runs/)", s)]


def script_calls(command: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each project script a command line calls, across `&&` and `;`."""
    calls = []
    for part in re.split(r"&&|;|\|", command):
        words = shlex.split(part)
        while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
            calls.append((words[1], words[2:]))
        elif words[0] == "torchrun":
            i = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if i is not None:  # a bare `torchrun --nproc_per_node=2` in prose names no script
                calls.append((words[i], words[i + 1 :]))
        elif words[0] == "bash" and len(words) > 1 and words[1].startswith("runs/"):
            calls.append((words[1], []))  # shell scripts: existence only
    return calls


def readme_calls() -> list[tuple[str, list[str]]]:
    """Every script call in README.md, and in docs/*.md, which the README links to for the longer commands."""
    calls = []
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        commands = fenced_commands(text) + inline_commands(text)
        calls += [call for command in commands for call in script_calls(command)]
    return calls


def help_key(script: str, args: list[str]) -> tuple[str, str | None]:
    """align.py lists each stage's own flags under `--stage X --help`; every other script has one --help."""
    if script == "align.py" and "--stage" in args:
        return script, args[args.index("--stage") + 1]
    return script, None


# Runs each script's --help in one interpreter (torch is imported once, not once per script): the script's own
# folder first on sys.path, as `python runs/x.py` has it, then the repository root.
HELP_DRIVER = """
import contextlib, io, json, os, runpy, sys
root, out = os.getcwd(), {}
for script, stage in json.loads(sys.argv[1]):
    sys.path[0] = os.path.join(root, os.path.dirname(script))
    if root not in sys.path:
        sys.path.insert(1, root)
    sys.argv = [script] + (["--stage", stage] if stage else []) + ["--help"]
    buf, code = io.StringIO(), None
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
    out[script + " " + str(stage)] = [code, buf.getvalue()]
print(json.dumps(out))
"""


@functools.cache
def help_flags() -> dict[tuple[str, str | None], frozenset[str]]:
    """The --flags each (script, stage) --help lists, all read by one subprocess, once per session."""
    keys = sorted({help_key(s, a) for s, a in readme_calls() if s.endswith(".py")}, key=str)
    r = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, json.dumps(keys)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads(r.stdout.splitlines()[-1])
    flags = {}
    for script, stage in keys:
        code, text = found[f"{script} {stage}"]
        assert code in (0, None) and text.startswith("usage:"), (
            f"{script} --help failed: {text[-1000:]}"
        )
        flags[script, stage] = frozenset(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text))
    return flags


def test_readme_has_script_commands():
    scripts = {script for script, _ in readme_calls()}
    assert {"sample.py", "align.py", "lora.py"} <= scripts, (
        f"the README shows only {sorted(scripts)}"
    )


def test_readme_commands_run_as_written():
    """Each script exists, and each --flag a command passes is one the script's --help lists."""
    bad = []
    for script, args in readme_calls():
        if not (ROOT / script).is_file():
            bad.append(f"{script} does not exist")
            continue
        if not script.endswith(".py"):
            continue  # shell scripts: existence only
        key = help_key(script, args)
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        unknown = sorted(flags - help_flags()[key])
        if unknown:
            bad.append(f"{script}{f' --stage {key[1]}' if key[1] else ''} does not take {unknown}")
    assert not bad, "commands that do not run as written:\n" + "\n".join(bad)


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move detail to docs/ (at most 250)"


def test_performance_section_has_measured_numbers():
    text = README.read_text()
    m = re.search(r"^## Performance\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "README.md has no '## Performance' section"
    rows = [ln for ln in m[1].splitlines() if ln.startswith("|") and not set(ln) <= set("|- ")]
    assert len(rows) >= 2, "the Performance section has no table"
    assert any(re.search(r"\d", ln) for ln in rows[1:]), "the Performance table has no number"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(
        r"```.*?```", "", path.read_text(), flags=re.S
    )  # links in code blocks are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and anchors on the same page
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files {broken}"
