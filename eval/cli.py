"""The evaluation subcommands of ``unconfuse``: eval, score, data download, data sample."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .prompts import DEFAULT_PROMPTS, MODES
from .scorer import PARSERS

EXIT_BAD_INPUT = 2


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a benchmark (writes predictions.jsonl, results.json, report.md)")
    p.add_argument("--model", required=True, help="preset name (configs/models), local folder or hub id")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--benchmark", required=True, help="mediconfusion, a folder, a file, or hf:<dataset id>")
    p.add_argument("--out", required=True, help="output folder; rerun with the same folder to resume")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per batch (default: preset's, else 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    p.add_argument("--parser", choices=sorted(PARSERS), default="strict",
                   help="how mc answers are read: strict (default) or reference (to reproduce the paper)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="prompt set version or YAML path")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for freeform mode (key from UNCONFUSE_JUDGE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--judge-model", help="judge model name for freeform mode")
    p.add_argument("--judge-temperature", type=float, default=0.0, help="judge sampling temperature (reference used 0.7)")
    p.add_argument("--tr", type=float, default=3, help="freeform: judge score margin an option needs to win")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="allow model code from the hub (off by default)")
    p.add_argument("--split", help="split of a Hugging Face dataset benchmark")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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

    data = sub.add_parser("data", help="benchmark data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("download", help="download MediConfusion (questions + images from PMC's open-access S3 bucket)")
    from .download import DEFAULT_IMAGE_DICT_URL, DEFAULT_PMC_BASE, DEFAULT_QUESTIONS_URL

    p.add_argument("--out", required=True)
    p.add_argument("--questions-url", default=DEFAULT_QUESTIONS_URL)
    p.add_argument("--image-dict-url", default=DEFAULT_IMAGE_DICT_URL)
    p.add_argument("--pmc-base", default=DEFAULT_PMC_BASE, help="bucket URL (mirrors, tests)")
    p.add_argument("--roco", help="a local ROCO dataset folder to take images from instead of PMC")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_download)

    p = data.add_parser("synth", help="build the embedded world: confusing pairs drawn on real radiology images")
    from .world import WorldConfig

    defaults = WorldConfig()
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--pairs", type=int, default=defaults.pairs, help="pairs over train/val/test (60/15/25%%)")
    p.add_argument("--image-size", type=int, default=defaults.image_size, help="pixels per side")
    p.add_argument("--bases-per-source", type=int, default=defaults.bases_per_source)
    p.add_argument("--corpus-size", type=int, default=defaults.corpus_size)
    p.add_argument("--finding-caption-prob", type=float, default=defaults.finding_caption_prob,
                   help="how often a corpus caption names the finding (low: encoders learn to miss findings)")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("sample", help="write the six-pair benchmark of pydicom's real radiology images")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    from .models import ModelLoadError
    from .pairs import BenchmarkError
    from .runner import EvalConfig, EvalInputError, run_eval
    from .scorer import PredictionsError, render_report

    cfg = EvalConfig(model=args.model, mode=args.mode, benchmark=args.benchmark, out=args.out,
                     batch_size=args.batch_size, limit=args.limit, prompts=args.prompts, parser=args.parser,
                     judge_url=args.judge_url, judge_model=args.judge_model, judge_temperature=args.judge_temperature,
                     tr=args.tr, device=args.device, trust_remote_code=args.trust_remote_code, split=args.split,
                     progress=not args.quiet)
    try:
        results = run_eval(cfg)
    except EvalInputError as exc:
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return _fail(str(exc))
    except (BenchmarkError, PredictionsError, ModelLoadError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(render_report(results))
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .pairs import BenchmarkError, load_benchmark
    from .runner import score_run
    from .scorer import PredictionsError, render_report

    out = Path(args.out)
    try:
        bench = load_benchmark(args.benchmark, split=args.split)
        predictions = Path(args.predictions)
        meta = {"benchmark": bench.name}
        run_meta = predictions.parent / "run.json"  # written by `unconfuse eval`: model, mode, prompt version
        if run_meta.exists():
            meta = {**json.loads(run_meta.read_text()), **meta}
        results = score_run(out, bench, parser=args.parser, meta=meta, predictions_path=predictions)
    except (BenchmarkError, PredictionsError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(render_report(results))
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    from .pairs import BenchmarkError, load_benchmark
    from .splits import write_splits

    try:
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
    from .download import DownloadConfig, download

    cfg = DownloadConfig(out=Path(args.out), questions_url=args.questions_url, image_dict_url=args.image_dict_url,
                         pmc_base=args.pmc_base, roco=Path(args.roco) if args.roco else None, jobs=args.jobs,
                         retries=args.retries, progress=not args.quiet)
    failures = download(cfg)
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"MediConfusion is in {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .world import WorldConfig, WorldError, synthesize

    cfg = WorldConfig(seed=args.seed, pairs=args.pairs, image_size=args.image_size,
                      bases_per_source=args.bases_per_source, corpus_size=args.corpus_size,
                      finding_caption_prob=args.finding_caption_prob)
    try:
        world = synthesize(cfg, args.out)
    except WorldError as exc:
        return _fail(str(exc))
    counts = world.manifest["counts"]
    print(f"world {world.manifest['identity']} in {world.root}: pairs {counts['pairs']}, "
          f"base images {counts['base_images']}, corpus {counts['corpus']}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import write_sample_benchmark

    print(f"wrote {write_sample_benchmark(args.out) / 'pairs.jsonl'}")
    return 0
