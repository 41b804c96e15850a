"""The project's ground rules, checked: line budgets (STYLE.md rule 25), one test command shared by the README and
CI, dependencies (diffusers/peft test-only, never PyPI's unrelated `nunchaku`), a docstring with its command in
every test file, `--help` of every script.

Run: python -m pytest -q tests/test_repo.py
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ae15.py", "align.py", "lora.py", "distill.py", "sample.py", "quantize.py"]


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_line_budgets():
    over = [f"{p.name}: {lines(p)}" for p in map(ROOT.joinpath, STAGES) if p.exists() and lines(p) > 600]
    over += [f"models/{p.name}: {lines(p)}" for p in (ROOT / "models").glob("*.py") if lines(p) > 500]
    # common.py: STYLE.md's "about 300", moved to 320 for shift_for and draw_prefixes (rule 25: the budget moves)
    over += [f"common.py: {lines(ROOT / 'common.py')}"] if lines(ROOT / "common.py") > 320 else []
    assert not over, f"over budget (stage 600, models/ 500, common.py 320 lines): {over}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    commands = [ln.strip() for b in blocks for ln in b.splitlines() if "pytest" in ln and not ln.startswith("#")]
    assert commands, "the README shows no pytest command"
    ci_command = next(ln.split("#")[0].strip() for ln in ci.splitlines() if "pytest" in ln and "python3 -m" in ln)
    assert commands[0].replace("python ", "python3 ") == ci_command


def test_dependencies():
    for req in ("requirements.txt", "tests/requirements.txt"):
        names = [re.split(r"[<>=!~\[ ]", ln.strip())[0].lower() for ln in (ROOT / req).read_text().splitlines()]
        assert "nunchaku" not in names, f"{req}: PyPI's `nunchaku` is an unrelated package"
    core = (ROOT / "requirements.txt").read_text()
    assert "diffusers" not in core and "peft" not in core
    for path in [*ROOT.glob("*.py"), *(ROOT / "models").glob("*.py")]:
        found = re.findall(r"^\s*(?:import|from)\s+(diffusers|peft)\b", path.read_text(), re.M)
        assert not found, f"{path.name} imports {found}: diffusers and peft are test-time references only"


def test_every_test_file_says_how_to_run_it():
    for path in (ROOT / "tests").glob("test_*.py"):
        doc = path.read_text().split('"""')
        assert len(doc) > 2 and "Run: python -m pytest" in doc[1], f"{path.name}: docstring must give its command"


@pytest.mark.parametrize("script", [*STAGES, "bench.py"])
def test_help_of_every_script(script):
    """Every flag's help is its field's comment; a stray % in one once crashed ae15.py --help."""
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]
