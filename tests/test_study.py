"""Scale-out of a study: cv folds as separate jobs (``cv --fold K`` / ``--collect``), ``unconfuse study
plan`` / ``collect``, and the Slurm templates (run here with stand-ins for srun and scontrol)."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from unconfuse.cli.commands import main
from unconfuse.cli.study import StudyError, load_study, plan_lines
from unconfuse.eval.scorer import read_predictions

REPO = Path(__file__).resolve().parents[1]
UNCONFUSE = [sys.executable, "-m", "unconfuse.cli"]
CV_ARGS = ["cv", "clip_hardneg", "--config", str(REPO / "configs/clip_hardneg/tiny.yaml"), "--folds", "2",
           "--benchmark", "world:test"]
# short runs; retention (its own tests) left out to keep these multi-process tests cheap
SHORT = ["train.max_steps=4", "train.eval_steps=2", "train.save_steps=2", "data.retention=none", "report_to=none"]


def _study(tmp_path: Path, **changes) -> Path:
    study = {"benchmark": "world:test", "folds": 2, "seeds": [0, 1], "out": str(tmp_path / "study"),
             "overrides": ["report_to=none", "data.retention=none", "train.max_steps=2", "train.eval_steps=2",
                           "train.save_steps=2"],
             "strategies": [{"name": "hardneg", "recipe": "clip_hardneg", "config": str(REPO / "configs/clip_hardneg/tiny.yaml")},
                            {"name": "clip-ft", "recipe": "clip_hardneg", "config": str(REPO / "configs/clip_hardneg/tiny.yaml"),
                             "overrides": ["loss.hardneg_weight=0"]}]}
    study.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))  # JSON is YAML
    return path


def test_plan_is_one_resumable_cv_fold_command_per_job(tmp_path, capsys):
    path = _study(tmp_path)
    assert main(["study", "plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 2 * 2 and lines == plan_lines(load_study(path))
    jobs = {}
    for line in lines:
        argv = shlex.split(line)
        assert argv[:3] == ["unconfuse", "cv", "clip_hardneg"]
        opts = dict(zip(argv[3::2], argv[4::2]))
        assert Path(opts["--config"]).is_absolute() and opts["--folds"] == "2" and opts["--seed"] == "0"
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        seed = next(o for o in overrides if o.startswith("train.seed=")).split("=")[1]
        strategy = next(o for o in overrides if o.startswith("strategy=")).split("=")[1]
        assert "resume_from_checkpoint=latest" in overrides
        assert opts["--out"] == str(tmp_path / "study" / strategy / f"seed-{seed}")
        assert ("loss.hardneg_weight=0" in overrides) == (strategy == "clip-ft")
        jobs[(strategy, seed, argv[argv.index("--fold") + 1])] = line
    assert sorted(jobs) == sorted((s, seed, k) for s in ("hardneg", "clip-ft") for seed in "01" for k in "01")


@pytest.mark.parametrize("change,message", [
    ({"folds": 1}, "folds: an integer of at least 2"),
    ({"seeds": [0, 0]}, "seeds: a list of distinct integers"),
    ({"fold": 2}, "unknown key 'fold'"),
    ({"baseline": "nope"}, "baseline 'nope' is not a recipe strategy's name"),
    ({"overrides": ["train.seed=3"]}, "the study sets train.seed itself"),
    ({"overrides": ["train.max_stepz=3"]}, "strategies[0] (hardneg)"),
    ({"strategies": [{"name": "a", "recipe": "nope", "config": "x.yaml"}]}, "recipe 'nope' is not one of"),
    ({"strategies": [{"name": "a b", "recipe": "clip_hardneg", "config": "x.yaml"}]}, "name: letters, digits"),
    ({"strategies": [{"name": "a", "recipe": "clip_hardneg", "config": "missing.yaml"}]}, "missing.yaml not found"),
    # a real model's config on the world's toy pairs: its folds are files, so the study's benchmark is what shows it
    ({"strategies": [{"name": "a", "recipe": "clip_hardneg", "config": str(REPO / "configs/clip_hardneg/biomedclip.yaml")}]},
     "--benchmark: the embedded world's 64-px toy images, with the real model 'biomedclip'"),
])
def test_bad_study_files_are_one_line_errors(tmp_path, capsys, change, message):
    assert main(["study", "plan", str(_study(tmp_path, **change))]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "study.yaml") in err and len(err.strip().splitlines()) == 1


VCD = {"name": "vcd", "eval": "vcd", "model": "tiny-llava", "mode": "greedy", "options": ["alpha=1"]}


def test_a_training_free_strategy_is_one_eval_job_per_seed_over_the_whole_benchmark(tmp_path):
    describe = {"name": "describe", "eval": "describe", "model": "tiny-llava", "mode": "greedy",
                "retention": "world:val"}
    study = load_study(_study(tmp_path, strategies=[*_study_strategies(tmp_path), VCD, describe]))
    lines = plan_lines(study)
    assert len(lines) == 8 + 2 + 1  # vcd draws noise: a job per seed; describe: one
    out = tmp_path / "study"
    assert lines[8] == shlex.join(["unconfuse", "eval", "--model", "tiny-llava", "--mode", "greedy", "--benchmark",
                                   "world:test", "--out", str(out / "vcd" / "seed-0"), "--strategy", "vcd",
                                   "--strategy-option", "alpha=1", "seed=0", "--quiet"])
    assert lines[10].endswith(f"--out {out / 'describe'} --strategy describe --retention world:val --quiet")


@pytest.mark.parametrize("entry, message", [
    ({**VCD, "options": ["beta=1"]}, "strategies[2]: --strategy-option 'beta=1': strategy vcd has no option 'beta'"),
    ({**VCD, "options": ["seed=1"]}, "the study sets seed itself"),
    ({**VCD, "mode": "clip"}, "mode 'clip': one of mc, greedy, prefix, freeform"),
    ({**VCD, "recipe": "mllm_sft"}, "unknown key 'recipe'; training-free strategy keys"),
])
def test_bad_training_free_strategies_are_named(tmp_path, capsys, entry, message):
    path = _study(tmp_path, strategies=[*_study_strategies(tmp_path), entry])
    assert main(["study", "plan", str(path)]) == 2
    assert message in capsys.readouterr().err


def _study_strategies(tmp_path):
    return json.loads(_study(tmp_path).read_text())["strategies"]


def test_a_strategy_starts_each_fold_and_seed_from_the_same_fold_and_seed_of_another(tmp_path):
    """init_from: the plan lists the warm-started strategy after its source and points each seed's cv at the source's
    cv of that seed; the cv hands fold k that cv's fold k (a run folder: its own fold's adapters, never another's)."""
    from unconfuse.cli.cv import fold_init

    sft = {"name": "sft", "recipe": "mllm_sft", "config": str(REPO / "configs/mllm_sft/tiny.yaml")}
    grpo = {"name": "grpo", "recipe": "mllm_grpo", "config": str(REPO / "configs/mllm_grpo/tiny.yaml"), "init_from": "sft"}
    lines = plan_lines(load_study(_study(tmp_path, strategies=[sft, grpo], baseline="sft")))
    assert [shlex.split(line)[2] for line in lines] == ["mllm_sft"] * 4 + ["mllm_grpo"] * 4
    for line in lines[4:]:
        argv = shlex.split(line)
        seed = next(a for a in argv if a.startswith("train.seed=")).split("=")[1]
        assert f"init_adapters={tmp_path / 'study' / 'sft' / f'seed-{seed}'}" in argv
    assert not any("init_adapters" in line for line in lines[:4])
    source = tmp_path / "study" / "sft" / "seed-0"
    (source / "splits").mkdir(parents=True)
    assert fold_init(str(source), 1) == [f"init_adapters={source / 'fold-1'}"]
    assert fold_init(str(source / "fold-1"), 1) == [] and fold_init(None, 1) == []  # a run folder is used as it is
    with pytest.raises(StudyError, match="init_from 'grpo' is not the name of a strategy listed before it"):
        load_study(_study(tmp_path, strategies=[{**sft, "init_from": "grpo"}, grpo], baseline="sft"))
    with pytest.raises(StudyError, match="the study sets init_adapters itself"):
        load_study(_study(tmp_path, strategies=[sft, {**grpo, "overrides": ["init_adapters=x"]}], baseline="sft"))


def test_slurm_array_template_runs_the_plan_line_of_its_index(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("".join(f"echo job {k} > {shlex.quote(str(tmp_path / f'ran-{k}'))}\n" for k in range(3)))
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_ARRAY_TASK_ID": "1"}
    done = subprocess.run(["bash", str(REPO / "configs/slurm/array.sbatch"), str(plan)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == ["ran-1"] and (tmp_path / "ran-1").read_text() == "job 1\n"
    env["SLURM_ARRAY_TASK_ID"] = "3"  # past the plan's end: an error naming the line, not a silent success
    done = subprocess.run(["bash", str(REPO / "configs/slurm/array.sbatch"), str(plan)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "has no line 4" in done.stderr
    first = (REPO / "configs/slurm/array.sbatch").read_text().splitlines()[1]
    assert first.startswith("# Submit") and "sbatch --array" in (REPO / "configs/slurm/array.sbatch").read_text().splitlines()[2]


def test_slurm_multi_node_template_starts_one_accelerate_launch_per_node(tmp_path):
    """With stand-ins for scontrol, srun (runs its command once per node, as Slurm does, with that
    node's SLURM_NODEID) and accelerate (records its arguments), the template's launch lines are
    those of a 2-node, 16-process run meeting at the first node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'for node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done\n')
    (bin_dir / "accelerate").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/node-$SLURM_NODEID.args\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:8"}
    done = subprocess.run(["bash", str(REPO / "configs/slurm/multi_node.sbatch"), "mllm_sft", "configs/mllm_sft/qwen2_5_vl.yaml",
                           "runs/x", "train.max_steps=10", "data.train=my pairs.jsonl"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for node in (0, 1):
        args = (tmp_path / f"node-{node}.args").read_text().splitlines()
        head = args[1:args.index("-m")]
        opts = dict(zip(head[::2], head[1::2]))
        assert args[0] == "launch" and len(head) == 12 and opts["--config_file"] == "configs/accelerate/multi_node.yaml"
        assert (opts["--num_machines"], opts["--num_processes"], opts["--machine_rank"]) == ("2", "16", str(node))
        assert (opts["--main_process_ip"], opts["--main_process_port"]) == ("gpu-node-07", "29500")
        tail = args[args.index("-m"):]
        assert tail == ["-m", "unconfuse.recipes.mllm_sft", "--config", "configs/mllm_sft/qwen2_5_vl.yaml", "--output-dir",
                        "runs/x", "resume_from_checkpoint=latest", "train.max_steps=10", "data.train=my pairs.jsonl"]


def test_multi_node_accelerate_config_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "configs/accelerate/multi_node.yaml"))
    assert (config.distributed_type, config.num_machines, config.num_processes) == ("MULTI_GPU", 2, 16)
    assert config.main_process_port == 29500 and config.rdzv_backend == "static"
    assert (REPO / "configs/accelerate/multi_node.yaml").read_text().startswith("# sbatch configs/slurm/multi_node.sbatch")


def test_fold_and_collect_arguments_are_checked(tmp_path, capsys):
    assert main([*CV_ARGS, "--fold", "2", "--out", str(tmp_path / "cv"), *SHORT]) == 2
    assert "a cv of 2 folds has folds 0 to 1" in capsys.readouterr().err
    assert main([*CV_ARGS, "--fold", "0", *SHORT]) == 2
    assert "--fold and --collect need --out" in capsys.readouterr().err
    assert main([*CV_ARGS, "--collect", "--out", str(tmp_path / "none"), *SHORT]) == 2
    assert "no cv here yet" in capsys.readouterr().err


def _pooled(cv: Path) -> tuple[dict, dict]:
    results = json.loads((cv / "results.json").read_text())
    return read_predictions(cv / "test" / "predictions.jsonl"), {k: results[k] for k in ("base", "final")}


@pytest.mark.slow  # two fold processes (one under accelerate launch), then the same cv in one process
def test_folds_as_separate_processes_collect_to_the_sequential_cv(tmp_path, capsys):
    separate = tmp_path / "separate"
    # collecting before any fold ran is refused with the list of what is missing
    assert main([*CV_ARGS, "--out", str(separate), "--collect", *SHORT]) == 2
    assert "no cv here yet" in capsys.readouterr().err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    fold_0 = subprocess.run([*UNCONFUSE, *CV_ARGS, "--out", str(separate), "--fold", "0", *SHORT], env=env,
                            capture_output=True, text=True, timeout=600)
    assert fold_0.returncode == 0, fold_0.stderr
    assert main([*CV_ARGS, "--out", str(separate), "--collect", *SHORT]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 folds have no results yet: fold-1 (not started)" in err and len(err.strip().splitlines()) == 1
    # a fold job with other settings is refused by the cv directory it would join
    assert main([*CV_ARGS, "--out", str(separate), "--fold", "1", *SHORT, "train.max_steps=7"]) == 2
    assert "holds another cv of clip_hardneg" in capsys.readouterr().err
    # fold 1 through its own launch (accelerate launch, one process), while the whole cv runs in this process
    fold_1 = subprocess.Popen([*UNCONFUSE, *CV_ARGS, "--out", str(separate), "--fold", "1", "--launch",
                               str(REPO / "configs/accelerate/single.yaml"), *SHORT], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sequential = tmp_path / "sequential"
    assert main([*CV_ARGS, "--out", str(sequential), *SHORT]) == 0
    assert fold_1.wait(timeout=600) == 0, fold_1.stdout.read()[-3000:]
    assert main([*CV_ARGS, "--out", str(separate), "--collect", *SHORT]) == 0
    (pred_sep, res_sep), (pred_seq, res_seq) = _pooled(separate), _pooled(sequential)
    assert len(pred_seq) == 160
    assert {k: r["answer"] for k, r in pred_sep.items()} == {k: r["answer"] for k, r in pred_seq.items()}
    # scores to float rounding: accelerate launch runs its process with other CPU thread settings (1e-7 apart here)
    assert [pred_sep[k]["scores"][o] for k in pred_seq for o in "AB"] == pytest.approx(
        [pred_seq[k]["scores"][o] for k in pred_seq for o in "AB"], rel=1e-5, abs=1e-6)
    assert res_sep == res_seq
    per_fold = [json.loads((cv / "results.json").read_text())["details"]["per_fold"] for cv in (separate, sequential)]
    assert per_fold[0] == per_fold[1]
    # the sequential cv, rerun, takes the separately run folds' results as its own (resume), and vice versa
    stamp = (separate / "fold-0" / "results.json").stat().st_mtime_ns
    assert main([*CV_ARGS, "--out", str(separate), *SHORT]) == 0
    assert (separate / "fold-0" / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.slow  # 8 fold jobs as processes, 2 at a time
def test_a_study_runs_through_plan_a_shell_loop_and_collect(tmp_path, capsys):
    study = _study(tmp_path, strategies=[*_study_strategies(tmp_path), VCD])  # and a training-free strategy
    assert main(["study", "plan", str(study)]) == 0
    plan = tmp_path / "plan.txt"
    plan.write_text(capsys.readouterr().out)
    assert main(["study", "collect", str(study)]) == 2  # nothing ran yet
    assert "10 of 10 jobs have not finished" in capsys.readouterr().err
    bin_dir = Path(sys.executable).parent  # the plan's `unconfuse` is this environment's
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    # the shell loop, two jobs at a time (what a Slurm array does with --array=0-7%2)
    done = subprocess.run(["bash", "-c", f"xargs -d '\\n' -P 2 -n 1 bash -c < {shlex.quote(str(plan))}"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert main(["study", "collect", str(study)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "study" / "study.json").read_text())
    assert (tmp_path / "study" / "compare" / "comparison.md").exists()
    rows = summary["rows"]
    assert len(rows) == 1 + 4 + 2  # the baseline (hardneg's pooled base model), 2 strategies x 2 seeds, vcd x 2 seeds
    assert sorted((r["strategy"], r["seed"]) for r in rows[1:]) == sorted(
        [(f"{s} (cv 2 folds)", seed) for s in ("hardneg", "clip-ft") for seed in (0, 1)]
        + [("vcd on tiny-llava", 0), ("vcd on tiny-llava", 1)])
    vcd_rows = [r for r in rows if r["strategy"] == "vcd on tiny-llava"]
    assert all(r["results"]["n_pairs"] == 80 for r in vcd_rows)  # the same pairs as every cv's pooled test
    assert sorted(summary["evals"]) == ["vcd/seed-0", "vcd/seed-1"]
    rows = [r for r in rows if r not in vcd_rows]
    groups = {g["strategy"]: g for g in summary["groups"]}
    assert groups["hardneg (cv 2 folds)"]["n_runs"] == 2 and groups["clip-ft (cv 2 folds)"]["seeds"] == [0, 1]
    for row in rows[1:]:  # each row is its cv's pooled test over the whole benchmark
        cv = tmp_path / "study" / row["strategy"].split(" ")[0] / f"seed-{row['seed']}"
        assert row["results"]["set_accuracy"] == pytest.approx(json.loads((cv / "results.json").read_text())["final"]["set_accuracy"])
        assert row["results"]["n_pairs"] == 80
    assert "over 2 seeds" in printed
