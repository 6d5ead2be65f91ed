"""The README's library example runs as written: a notebook's path through unconfuse (evaluate, a recipe from
Python, the trained adapters loaded back, compare)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    text = README.read_text()
    section = text[text.index("## In Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # trains 20 steps of the tiny LLaVA (its pretrained base is built once per session)
def test_the_readme_library_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(library_example(), str(README), "exec"), namespace)
    base, tuned, run, comparison = namespace["base"], namespace["tuned"], namespace["run"], namespace["compare"](
        namespace["base"], namespace["tuned"])
    assert run.steps == 20 and (tmp_path / "runs" / "notebook-sft" / "results.json").exists()
    assert len(base.records) == len(tuned.records) == 2 * comparison["n_pairs"] == 160
    assert run.base["set_accuracy"] == base.scores["set_accuracy"]  # the run's base scores, recomputed in memory
    # 20 steps beat no validation score of step 0, so step 0 is selected: its adapters, loaded back and merged,
    # reproduce the base's scores exactly (LoRA's B starts at zero; the fully trained modules start as the base's)
    assert run.best_step == 0 and [r["scores"] for r in tuned.records] == [r["scores"] for r in base.records]
    assert comparison["set_accuracy_diff"] == 0.0 and comparison["mcnemar_p"] == 1.0


def test_compare_refuses_evaluations_of_other_pairs(world, sample_bench):
    from unconfuse.eval import Evaluation, compare, load_benchmark

    first, second = load_benchmark(str(world.root / "test")), load_benchmark(str(sample_bench))
    with pytest.raises(ValueError, match="are not the same pairs"):
        compare(Evaluation([], {}, first), Evaluation([], {}, second))
