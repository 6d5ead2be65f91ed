"""The subcommands of ``unconfuse`` that need no training: eval, score, splits, mine, compare, atlas, card, push, data,
convert."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unconfuse.eval.launch import accelerate_launch, launch_state, read_accelerate_config, record_exit_status
from unconfuse.eval.options import add_config_arguments, config_from_args, config_to_argv
from unconfuse.eval.scorer import PARSERS
from unconfuse.eval.world import prepare

if TYPE_CHECKING:
    from unconfuse.eval.runner import EvalConfig

EXIT_BAD_INPUT = 2
# a config's `progress` field is the command line's `--quiet` (stores False)
QUIET = {"flags": ["--quiet"], "action": "store_false"}
EVAL_FLAGS = {"progress": QUIET}


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    from unconfuse.eval.runner import EvalConfig

    p = sub.add_parser("eval", help="evaluate a model on a benchmark (writes predictions.jsonl, results.json, report.md)")
    add_config_arguments(p, EvalConfig, flags=EVAL_FLAGS)
    p.add_argument("--launch", metavar="ACCELERATE_YAML", help="accelerate config (configs/accelerate/ddp.yaml): the "
                   "pairs split across its processes (one per GPU), one predictions.jsonl as a one-process run writes")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score a predictions.jsonl on a benchmark")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parser", choices=sorted(PARSERS), default="strict")
    p.add_argument("--split")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("splits", help="grouped folds: pairs that share an image stay in one fold")
    p.add_argument("--benchmark", required=True, help="mediconfusion, a folder, a file, hf:<id> or world:<split>")
    p.add_argument("--folds", type=int, required=True)
    p.add_argument("--seed", type=int, default=0, help="orders components of equal size")
    p.add_argument("--out", required=True, help="folder for fold-<k>.jsonl and splits.json")
    p.add_argument("--split", help="split of a Hugging Face dataset benchmark")
    p.set_defaults(func=cmd_splits)

    from unconfuse.eval.tools.mining import MiningConfig

    p = sub.add_parser("mine", help="mine confusing pairs from an image-caption corpus (encoder A alike, encoder B apart)")
    add_config_arguments(p, MiningConfig)
    p.add_argument("--no-exclude", action="store_true", help="exclude nothing")
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("compare", help="compare runs (recipe, cv or eval directories) with CIs and significance against a baseline")
    p.add_argument("runs", nargs="+", help="run, cv or scored directories")
    p.add_argument("--baseline", required=True, help="the run to compare against, e.g. RUN/base or an eval directory")
    p.add_argument("--out", required=True, help="folder for comparison.md, comparison.csv, comparison.png")
    p.add_argument("--benchmark", help="test benchmark (default: the one the runs name)")
    p.add_argument("--force", action="store_true", help="write into an --out holding another comparison "
                   "(its contents are moved aside, not deleted)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("atlas", help="failure atlas: one HTML page of every pair, its two images and each run's answers, "
                       "marked fixed / broken / still confused / right against a baseline")
    p.add_argument("runs", nargs="+", help="run, cv or scored directories (a run or cv directory: its test/ scores)")
    p.add_argument("--baseline", help="the run to compare against (default: a single run directory's base/, "
                   "else the first directory)")
    p.add_argument("--out", required=True, help="folder for index.html, images/ and atlas.json")
    p.add_argument("--label", action="append", help="a name for each directory, in order (default: strategy and seed)")
    p.add_argument("--benchmark", help="test benchmark (default: the one the runs name)")
    p.add_argument("--force", action="store_true", help="write into an --out holding another atlas "
                   "(its contents are moved aside, not deleted)")
    p.add_argument("--wandb", action="store_true", help="also log the atlas as a W&B table of images "
                   "(online or offline as WANDB_MODE says; project WANDB_PROJECT, default unconfuse)")
    p.set_defaults(func=cmd_atlas)

    p = sub.add_parser("card", help="write a finished run's model card (README.md with model-index metadata and its "
                       "evidence: test scores before and after with CIs and McNemar p, retention change); no network")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--out", help="where to write it (default RUN/README.md)")
    p.add_argument("--merged", action="store_true", help="describe the weights as merged into their base (as push --merged)")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("push", help="upload a finished run's selected weights with its model card and evidence to the "
                       "Hugging Face Hub (token from HF_TOKEN only; endpoint HF_ENDPOINT)")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--repo-id", required=True, help="the model repo, e.g. you/llava-med-unconfused (created when missing)")
    p.add_argument("--merged", action="store_true", help="upload the LoRA adapters merged into their base model")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="a branch to push to (created when missing; default main)")
    p.set_defaults(func=cmd_push)

    convert = sub.add_parser("convert", help="convert a checkpoint in its authors' format into one eval loads").add_subparsers(
        dest="convert_command", required=True)
    p = convert.add_parser("llava-med", help="LLaVA-Med v1.5 (LLaVA's llava_mistral format) -> transformers "
                           "LlavaForConditionalGeneration with LLaVA-Med's prompt format and image padding")
    p.add_argument("src", help="LLaVA-Med's checkpoint folder, e.g. a local snapshot of microsoft/llava-med-v1.5-mistral-7b")
    p.add_argument("--vision-tower", required=True,
                   help="the CLIP tower its config names (mm_vision_tower): hub id or local CLIPModel/CLIPVisionModel folder")
    p.add_argument("--tokenizer", help="LLaVA-Med's tokenizer, hub id or folder (default: the one in SRC)")
    p.add_argument("--out", required=True, help="folder for the converted model, e.g. {home}/models/llava-med-v1.5-mistral-7b-hf")
    p.add_argument("--seed", type=int, default=0, help="draws the embedding rows of the added <image> and <pad> tokens")
    p.set_defaults(func=cmd_convert_llava_med)

    data = sub.add_parser("data", help="benchmark data").add_subparsers(dest="data_command", required=True)
    from unconfuse.eval.download import DownloadConfig

    p = data.add_parser("download", help="download MediConfusion (questions + images from PMC's open-access S3 bucket)")
    add_config_arguments(p, DownloadConfig, flags={"progress": QUIET})
    p.set_defaults(func=cmd_download)

    from unconfuse.eval.world import WorldConfig

    p = data.add_parser("synth", help="build the embedded world: confusing pairs drawn on real radiology images")
    p.add_argument("--out", required=True, help="folder of the world (train/, val/, test/, corpus.jsonl, world.json)")
    add_config_arguments(p, WorldConfig)
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("sample", help="write the six-pair benchmark of pydicom's real radiology images")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"error: {message}", file=sys.stderr)
    record_exit_status(code)  # under `--launch`, the status the launching command returns
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    from unconfuse.eval.folders import RunDirError
    from unconfuse.eval.models import ModelLoadError
    from unconfuse.eval.pairs import BenchmarkError
    from unconfuse.eval.runner import EvalConfig, EvalInputError, check_inputs, eval_strategy, run_eval
    from unconfuse.eval.scorer import PredictionsError, render_report
    from unconfuse.eval.strategies import StrategyError
    from unconfuse.eval.tools.mining import MiningError

    cfg = config_from_args(EvalConfig, args)
    if getattr(args, "launch", None):
        return launch_eval(cfg, args.launch)
    state = launch_state()  # under accelerate launch: the distributed state, before any model loads
    try:
        with state.main_first():  # one process builds the world and tiny models, the others then find them
            strategy = eval_strategy(cfg)
            corpus = strategy.options.get("corpus")
            prepare(benchmarks=[cfg.benchmark, cfg.retention, corpus])  # the embedded world, when asked for (seconds)
            checked = check_inputs(cfg)  # bad input fails here, before a tiny preset is built (minutes for base models)
            prepare(models=[cfg.model, strategy.options.get("encoder")])
        results = run_eval(cfg, state, checked)
    except EvalInputError as exc:
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return _fail(str(exc))
    except (BenchmarkError, PredictionsError, ModelLoadError, FileNotFoundError, RunDirError, StrategyError,
            MiningError) as exc:
        return _fail(str(exc))
    if results is None:  # a launched process other than the main one: the main one reports
        return 0
    print(render_report(results))
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def launch_eval(cfg: EvalConfig, accelerate_config: str) -> int:
    """``unconfuse eval --launch ACCEL``: the same evaluation in every process ``accelerate launch`` starts
    (``python -m unconfuse.cli.eval eval ...``); they split the batches and the main one gathers."""
    path = Path(accelerate_config)
    if not path.is_file():
        return _fail(f"--launch {accelerate_config}: no such file (configs/accelerate/ddp.yaml is one)")
    if read_accelerate_config(path).get("distributed_type") == "DEEPSPEED":
        return _fail(f"--launch {accelerate_config}: DeepSpeed shards training state; evaluation runs whole "
                     "models side by side: use a DDP config (configs/accelerate/ddp.yaml)")
    return accelerate_launch("unconfuse.cli.eval", path, ["eval", *config_to_argv(cfg, flags=EVAL_FLAGS)])


def cmd_score(args: argparse.Namespace) -> int:
    from unconfuse.eval.benchmarks import BenchmarkError, load_benchmark
    from unconfuse.eval.runner import score_run
    from unconfuse.eval.runs import RunFormatError, read_scored
    from unconfuse.eval.scorer import PredictionsError, render_report

    out = Path(args.out)
    try:
        bench = load_benchmark(args.benchmark, split=args.split)
        predictions = Path(args.predictions)
        where = Path(args.benchmark)  # recorded as the argument that loads these pairs again (compare does)
        meta = {"benchmark": bench.name, "benchmark_path": str(where.resolve()) if where.exists() else args.benchmark}
        run_meta = predictions.parent / "run.json"  # written by `unconfuse eval`: model, mode, prompt version
        retention = None
        if run_meta.exists():
            meta = {**json.loads(run_meta.read_text()), **meta}
            if meta.get("retention") and (predictions.parent / "results.json").exists():
                # rescoring the answers (another parser, a subset of pairs) does not change how the model answered
                # the retention set: the evaluation's block is carried over
                retention = read_scored(predictions.parent).get("retention")
        results = score_run(out, bench, parser=args.parser, meta=meta, predictions_path=predictions,
                            retention=retention)
    except (BenchmarkError, PredictionsError, RunFormatError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(render_report(results))
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    from unconfuse.eval.benchmarks import BenchmarkError, load_benchmark
    from unconfuse.eval.splits import write_splits

    try:
        prepare(benchmarks=[args.benchmark])
        summary = write_splits(load_benchmark(args.benchmark, split=args.split), args.folds, args.out, args.seed)
    except (BenchmarkError, ValueError) as exc:
        return _fail(str(exc))
    print(f"{summary['pairs']} pairs, {summary['components']} image-sharing components "
          f"(largest {summary['largest_component']} pairs) -> {args.folds} folds in {args.out}")
    for row in summary["table"]:
        cats = ", ".join(f"{k} {v}" for k, v in row["categories"].items())
        print(f"  fold {row['fold']}: {row['pairs']} pairs, {row['images']} images, {row['components']} components; {cats}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from unconfuse.eval.download import DownloadConfig, DownloadError, download

    cfg = config_from_args(DownloadConfig, args)
    try:
        failures = download(cfg)
    except DownloadError as exc:
        return _fail(str(exc), 1)
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"MediConfusion is in {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from unconfuse.eval.world import WorldConfig, WorldError, synthesize

    cfg = config_from_args(WorldConfig, args)
    try:
        world = synthesize(cfg, args.out)
    except WorldError as exc:
        return _fail(str(exc))
    counts = world.manifest["counts"]
    print(f"world {world.manifest['identity']} in {world.root}: pairs {counts['pairs']}, "
          f"base images {counts['base_images']}, corpus {counts['corpus']}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from unconfuse.eval.world.sample import write_sample_benchmark

    print(f"wrote {write_sample_benchmark(args.out) / 'pairs.jsonl'}")
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    from unconfuse.eval.folders import RunDirError
    from unconfuse.eval.judge import JudgeError
    from unconfuse.eval.models.base import ModelLoadError
    from unconfuse.eval.pairs import BenchmarkError
    from unconfuse.eval.tools.mining import MiningConfig, MiningError, mine

    cfg = config_from_args(MiningConfig, args, exclude=[] if args.no_exclude else args.exclude)
    try:
        report = mine(cfg)
    except (MiningError, BenchmarkError, ModelLoadError, RunDirError) as exc:
        return _fail(str(exc))
    except JudgeError as exc:
        return _fail(str(exc), 1)
    unreadable = f", {report['unreadable_images']} unreadable (skipped, listed in mining.json)" if report["unreadable_images"] else ""
    print(f"{report['corpus_images']} corpus images{unreadable}, {report['leakage']['excluded_images']} excluded as benchmark "
          f"images or near-duplicates; {report['candidates_sim_a']} pairs with cos(A) >= {cfg.min_sim_a}, "
          f"{report['candidates_rule']} of them with cos(B) <= {cfg.max_sim_b}; kept {report['pairs']} "
          f"({report['search_backend']} search, {report['wall_time_s']:.1f} s) -> {args.out}/pairs.jsonl")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from unconfuse.eval.folders import RunDirError
    from unconfuse.eval.pairs import BenchmarkError
    from unconfuse.eval.tools.compare import CompareError, compare_summary, run_compare

    try:
        summary = run_compare(args.runs, args.baseline, args.out, benchmark=args.benchmark, force=args.force)
    except (CompareError, BenchmarkError, RunDirError) as exc:
        return _fail(str(exc))
    print(compare_summary(summary, Path(args.out)))
    return 0


def cmd_atlas(args: argparse.Namespace) -> int:
    from unconfuse.eval.folders import RunDirError
    from unconfuse.eval.pairs import BenchmarkError
    from unconfuse.eval.tools.atlas import AtlasError, atlas_summary, write_atlas
    from unconfuse.eval.tools.compare import CompareError

    try:
        index = write_atlas(args.runs, args.out, args.baseline, args.label, benchmark=args.benchmark, force=args.force,
                            wandb=args.wandb)
    except (AtlasError, CompareError, BenchmarkError, RunDirError) as exc:
        return _fail(str(exc))
    print(atlas_summary(json.loads((index.parent / "atlas.json").read_text()), index))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from unconfuse.eval.pairs import BenchmarkError
    from unconfuse.eval.tools.hub import HubError, write_card

    try:
        path = write_card(args.run, args.out, merged=args.merged)
    except (HubError, BenchmarkError) as exc:
        return _fail(str(exc))
    print(f"wrote {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from unconfuse.eval.pairs import BenchmarkError
    from unconfuse.eval.tools.hub import HubError, push

    try:
        url = push(args.run, args.repo_id, merged=args.merged, private=args.private, revision=args.revision)
    except (HubError, BenchmarkError) as exc:
        return _fail(str(exc))
    except HfHubHTTPError as exc:  # the Hub refused (no such user, no write access, ...): its first line
        return _fail(f"push to {args.repo_id}: {str(exc).splitlines()[0]}")
    print(f"pushed {args.run} to {url}")
    return 0


def cmd_convert_llava_med(args: argparse.Namespace) -> int:
    from unconfuse.eval.convert import ConvertError, convert_llava_med
    from unconfuse.eval.home import unconfuse_home

    out = args.out.replace("{home}", str(unconfuse_home()))
    try:
        convert_llava_med(args.src, args.vision_tower, args.tokenizer, out, seed=args.seed)
    except ConvertError as exc:
        return _fail(str(exc))
    print(f"converted {args.src} -> {out} (LlavaForConditionalGeneration; eval it with --model {out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """These commands alone (what every process of ``unconfuse eval --launch`` runs):
    ``python -m unconfuse.cli.eval eval ...``."""
    parser = argparse.ArgumentParser(prog="unconfuse")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.func``); its exit status. SIGTERM / SIGINT: the run saves at its next clean
    point and says so in one line."""
    from unconfuse.eval.stopping import Stopped, graceful_stop, report_stopped

    with graceful_stop():
        try:
            return int(args.func(args) or 0)
        except Stopped as exc:
            return report_stopped(exc)


if __name__ == "__main__":
    sys.exit(main())
