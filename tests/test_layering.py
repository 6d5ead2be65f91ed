"""Architecture rules that code review alone would not keep."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_eval_never_imports_train_or_recipes():
    offenders = []
    for path in (REPO / "eval").rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if re.match(r"\s*(from|import)\s+(unconfuse\.(train|recipes)|\.\.+(train|recipes))\b", line):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}")
    assert not offenders


def test_the_scorer_imports_neither_torch_nor_transformers():
    code = ("import sys, unconfuse.eval.scorer, unconfuse.eval.pairs; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_top_level_train_or_eval_modules_are_installed():
    code = "import importlib.util as u; print(u.find_spec('train'), u.find_spec('eval'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.stdout.strip() == "None None"
