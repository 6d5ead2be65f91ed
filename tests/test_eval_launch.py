"""`unconfuse eval --launch`: a one-process run's batches split across 2 CPU processes and gathered into
the predictions file a one-process run writes; resuming from what every process wrote."""
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unconfuse.cli.commands import main
from unconfuse.eval import runner
from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.launch import accelerate_launch
from unconfuse.eval.pairs import Benchmark, Pair
from unconfuse.eval.runner import EvalConfig, assign_chunks, gather_predictions, part_path, run_eval
from unconfuse.eval.splits import image_key

from .interrupt import assert_same_answers
from .stopping_eval import STOP_RANK_ENV

REPO = Path(__file__).resolve().parents[1]
DDP = str(REPO / "configs" / "accelerate" / "ddp.yaml")


def eval_args(model: str, mode: str, bench: Path, out: Path, batch_size: int) -> list[str]:
    return ["eval", "--model", model, "--mode", mode, "--benchmark", str(bench), "--out", str(out),
            "--batch-size", str(batch_size), "--quiet"]


def one_process_run(model: str, mode: str, bench: Path, out: Path, batch_size: int) -> None:
    run_eval(EvalConfig(model=model, mode=mode, benchmark=str(bench), out=str(out), batch_size=batch_size, progress=False))


def shares(stderr: str) -> dict[int, int]:
    """Process rank -> pairs it answers, from the line each launched process prints."""
    return {int(rank): int(n) for rank, n in re.findall(r"process (\d+) of 2: (\d+) pairs to answer", stderr)}


def chunked(bench: Benchmark, size: int) -> list[list[Pair]]:
    return [bench.pairs[i:i + size] for i in range(0, len(bench.pairs), size)]


def processes_of_images(bench: Benchmark, chunks: list[list[Pair]], assignment: list[list[int]]) -> dict[str, set[int]]:
    where: dict[str, set[int]] = {}
    for rank, indices in enumerate(assignment):
        for i in indices:
            for pair in chunks[i]:
                for ref in (pair.image_1, pair.image_2):
                    where.setdefault(image_key(bench, ref), set()).add(rank)
    return where


def synthetic(root: Path, images: list[tuple[str, str]]) -> Benchmark:
    return Benchmark([Pair(f"p{i:03d}", a, b, "q?", "x", "y", "A", "B") for i, (a, b) in enumerate(images)], root, "synthetic")


# ---------------------------------------------------------------------------------------------
# Which process answers which batch (fast, no launch)


def test_chunks_go_whole_to_processes_with_their_images_and_loads_balance(tmp_path, sample_bench):
    bench = load_benchmark(sample_bench)
    # s001 and s006 share ct_head, s005 and s006 mr_abdomen, s003 and s004 cr_chest
    assert assign_chunks(bench, chunked(bench, 1), 2) == [[0, 4, 5], [1, 2, 3]]
    assert assign_chunks(bench, chunked(bench, 2), 2) == [[0, 2], [1]]
    assert assign_chunks(bench, chunked(bench, 2), 1) == [[0, 1, 2]]

    # 6 hub images, chunk k holds 2 pairs around hub k % 6: 6 groups of 2 chunks, interleaved in the list
    hubs = synthetic(tmp_path, [(f"hub{(i // 2) % 6}.png", f"leaf{i}.png") for i in range(24)])
    chunks = chunked(hubs, 2)
    for processes in (2, 3, 6):  # the groups fit: no image in two processes
        assignment = assign_chunks(hubs, chunks, processes)
        assert [len(a) for a in assignment] == [12 // processes] * processes
        assert all(len(ranks) == 1 for ranks in processes_of_images(hubs, chunks, assignment).values())
    # 4 processes: whole groups would give one process 4 chunks; balance (3 each) cuts two groups
    assignment = assign_chunks(hubs, chunks, 4)
    assert [len(a) for a in assignment] == [3, 3, 3, 3]
    assert sum(len(ranks) > 1 for ranks in processes_of_images(hubs, chunks, assignment).values()) == 2

    # one chain of images, one group: cut once, in the middle of the chain
    chain = synthetic(tmp_path, [(f"c{i}.png", f"c{i + 1}.png") for i in range(40)])
    chunks = chunked(chain, 2)
    assignment = assign_chunks(chain, chunks, 2)
    assert assignment == [list(range(10)), list(range(10, 20))]
    assert [image for image, ranks in processes_of_images(chain, chunks, assignment).items() if len(ranks) > 1] == \
        [image_key(chain, "c20.png")]

    rng = random.Random(0)
    for _ in range(20):
        names = [f"i{k}.png" for k in range(rng.randint(2, 50))]
        bench = synthetic(tmp_path, [tuple(rng.sample(names, 2)) for _ in range(rng.randint(1, 70))])
        for size in (1, 3, 8):
            chunks = chunked(bench, size)
            for processes in (2, 3, 5):
                assignment = assign_chunks(bench, chunks, processes)
                assert sorted(i for a in assignment for i in a) == list(range(len(chunks)))  # each chunk once
                assert all(a == sorted(a) for a in assignment)
                assert max(map(len, assignment)) == -(-len(chunks) // processes)  # no process over its share


def test_mediconfusion_at_8_pairs_a_batch_splits_evenly(mediconfusion_dir):
    bench = load_benchmark(mediconfusion_dir)
    chunks = chunked(bench, 8)  # the image-sharing links join all 22 batches into one group
    assignment = assign_chunks(bench, chunks, 2)
    assert [len(a) for a in assignment] == [11, 11]
    where = processes_of_images(bench, chunks, assignment)
    assert sum(len(ranks) > 1 for ranks in where.values()) < 10 < len(where)  # few images encoded twice


def test_gathering_orders_as_one_process_keeps_lines_and_drops_torn_ones(tmp_path, sample_bench):
    bench = load_benchmark(sample_bench)
    line = {(p.id, side): json.dumps({"pair_id": p.id, "image": side, "answer": "A", "raw": "A",
                                      "scores": {"A": 0.1 * side, "B": 0.2}}) + "\n"
            for p in bench.pairs for side in (1, 2)}
    one_process = "".join(line.values())
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text(line["s001", 1] + line["s001", 2] + '{"pair_id": "s002", "im')
    part_path(out, 0).parent.mkdir()
    part_path(out, 0).write_text(line["s005", 1] + line["s005", 2] + line["s006", 2] + line["s006", 1] + '{"pai')
    part_path(out, 1).write_text(line["s003", 2] + line["s002", 1] + line["s002", 2] + line["s003", 1])
    part_path(out, 10).write_text(line["s004", 1] + line["s004", 2] + line["s001", 1])  # rank 10 sorts after 1
    gather_predictions(out, bench)
    assert (out / "predictions.jsonl").read_text() == one_process
    assert not (out / "parts").exists()
    before = (out / "predictions.jsonl").stat()
    gather_predictions(out, bench)  # in order, no parts: untouched
    assert (out / "predictions.jsonl").stat().st_mtime_ns == before.st_mtime_ns


def test_the_launched_processes_get_the_command_line_the_user_typed(tmp_path, monkeypatch):
    from unconfuse.cli.eval import EVAL_FLAGS
    from unconfuse.cli.commands import build_parser
    from unconfuse.eval.options import config_from_args, config_to_argv

    launched = {}
    monkeypatch.setattr("unconfuse.cli.eval.accelerate_launch", lambda module, config, argv: launched.update(
        config=str(config), module=module, argv=argv) or 0)
    typed = ["--model", "tiny-llava", "--mode", "prefix", "--benchmark", "b", "--out", str(tmp_path), "--batch-size", "3",
             "--quiet", "--trust-remote-code", "--judge-margin", "2.5", "--device", "cpu", "--force"]
    assert main(["eval", *typed, "--launch", DDP]) == 0
    assert launched["config"] == DDP and launched["module"] == "unconfuse.cli.eval"
    cfg = config_from_args(EvalConfig, build_parser().parse_args(["eval", *typed]))
    assert launched["argv"] == ["eval", *config_to_argv(cfg, flags=EVAL_FLAGS)]
    assert config_from_args(EvalConfig, build_parser().parse_args(launched["argv"])) == cfg
    assert config_from_args(EvalConfig, build_parser().parse_args(
        ["eval", *config_to_argv(EvalConfig("m", "mc", "b", "o"), flags=EVAL_FLAGS)])) == EvalConfig("m", "mc", "b", "o")


def test_a_deepspeed_or_missing_launch_config_exits_2(tmp_path, sample_bench, capsys):
    args = eval_args("tiny-clip", "clip", sample_bench, tmp_path / "o", 1)
    assert main([*args, "--launch", str(REPO / "configs" / "accelerate" / "zero2.yaml")]) == 2
    assert "use a DDP config" in capsys.readouterr().err
    assert main([*args, "--launch", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Two CPU processes under accelerate launch


@pytest.mark.slow
@pytest.mark.parametrize("model, mode, batch_size", [("tiny-llava", "greedy", 2), ("tiny-clip", "clip", 1)])
def test_two_processes_write_what_one_process_writes(tmp_path, sample_bench, model, mode, batch_size):
    one_process_run(model, mode, sample_bench, tmp_path / "one", batch_size)
    two = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "unconfuse.cli",
                           *eval_args(model, mode, sample_bench, two, batch_size), "--launch", DDP],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 pairs a batch: batches 0 and 2 share ct_head (s001, s006), so process 0 answers 4 pairs
    assert shares(done.stderr) == ({0: 4, 1: 2} if batch_size == 2 else {0: 3, 1: 3})
    assert done.stdout.count("| **All** | 6 |") == 1  # one report, from the main process
    assert_same_answers(two / "predictions.jsonl", tmp_path / "one" / "predictions.jsonl")  # on some CPUs, last bits
    assert json.loads((two / "results.json").read_text()) == json.loads((tmp_path / "one" / "results.json").read_text())
    assert not (two / "parts").exists()


@pytest.mark.slow
def test_a_killed_launch_loses_one_batch_and_resumes_in_one_process(tmp_path, sample_bench, monkeypatch):
    one_process_run("tiny-llava", "greedy", sample_bench, tmp_path / "one", 1)
    out = tmp_path / "killed"
    monkeypatch.setenv(STOP_RANK_ENV, "1")
    assert accelerate_launch("tests.stopping_eval", DDP, eval_args("tiny-llava", "greedy", sample_bench, out, 1)) != 0
    monkeypatch.delenv(STOP_RANK_ENV)
    # process 1 (batches s002, s003, s004) answered s002, then died writing s003; process 0 was stopped wherever it was
    *whole, torn = part_path(out, 1).read_text().split("\n")
    assert [json.loads(line)["pair_id"] for line in whole] == ["s002", "s002"] and torn.startswith('{"pair_id": "torn')
    written = {(rec["pair_id"], rec["image"]) for rank in (0, 1) if part_path(out, rank).exists()
               for rec in map(json.loads, part_path(out, rank).read_text().split("\n")[:-1])}
    left = sum(any((p.id, side) not in written for side in (1, 2)) for p in load_benchmark(sample_bench).pairs)

    counted = {"pairs": 0}
    real = runner.answer_pairs

    def counting(backend, spec, cfg, prompts, bench, pairs, judge=None):
        counted["pairs"] += len(pairs)
        return real(backend, spec, cfg, prompts, bench, pairs, judge)

    monkeypatch.setattr(runner, "answer_pairs", counting)
    one_process_run("tiny-llava", "greedy", sample_bench, out, 1)  # another process count resumes it
    assert counted["pairs"] == left
    assert_same_answers(out / "predictions.jsonl", tmp_path / "one" / "predictions.jsonl")
    assert not (out / "parts").exists()


@pytest.mark.slow
def test_a_launch_resumes_from_what_every_earlier_process_wrote(tmp_path, sample_bench):
    full = tmp_path / "one"
    one_process_run("tiny-clip", "clip", sample_bench, full, 1)
    lines = (full / "predictions.jsonl").read_text().splitlines(keepends=True)  # s001 1, s001 2, s002 1, ...
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    for name in ("predictions.jsonl", "results.json", "report.md"):
        (out / name).unlink()
    # an earlier launch of 3 processes, killed: s001 gathered; process 0 had half of s005's batch and a torn line;
    # process 2 had s003, whose first answer is marked so that a recomputed one would show
    marked = json.dumps({**json.loads(lines[4]), "answer": "A", "raw": "A", "scores": {"A": 7.0, "B": -7.0}}) + "\n"
    (out / "predictions.jsonl").write_text(lines[0] + lines[1])
    part_path(out, 0).parent.mkdir()
    part_path(out, 0).write_text(lines[8] + '{"pair_id": "s005", "ima')
    part_path(out, 2).write_text(marked + lines[5])
    alone = tmp_path / "resumed-alone"
    shutil.copytree(out, alone)
    one_process_run("tiny-clip", "clip", sample_bench, alone, 1)
    done = subprocess.run([sys.executable, "-m", "unconfuse.cli",
                           *eval_args("tiny-clip", "clip", sample_bench, out, 1), "--launch", DDP],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # left: s002, s004, s005, s006; s005 and s006 share mr_abdomen
    assert shares(done.stderr) == {0: 2, 1: 2}
    # what one process resuming the same folder writes (the batches of both are the same)
    assert (out / "predictions.jsonl").read_bytes() == (alone / "predictions.jsonl").read_bytes()
    assert (out / "predictions.jsonl").read_text().splitlines(keepends=True)[4] == marked  # not answered again
    assert not (out / "parts").exists()
