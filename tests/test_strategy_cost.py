"""bench/strategy_cost.py runs every strategy beside plain scoring on the same questions and prints the ratios."""
import pytest

from bench.strategy_cost import main


@pytest.mark.slow  # every strategy on 2 pairs (~4 s)
def test_strategy_cost_bench_times_every_strategy_against_plain(world, capsys):
    table = main(["--model", "tiny-llava", "--benchmark", str(world.root / "test"), "--pairs", "2", "--repeats", "1",
                  "--modes", "greedy", "--corpus", str(world.root / "corpus.jsonl"), "--encoder", "tiny-clip"])
    assert set(table) == {f"greedy/{name}" for name in ("plain", "vcd", "describe", "retrieve")}
    assert table["greedy/plain"]["ratio"] == 1.0
    assert all(row["s_per_question"] > 0 for row in table.values())
    assert "x plain" in capsys.readouterr().out
