"""The run lifecycle every recipe shares, as steps a recipe calls in order (torchtune-style: no base
class, no mixins; each recipe file reads top to bottom)::

    run = open_run(RECIPE, cfg, strategy, modes)   # launch state, run directory, config.yaml, data, leakage.json, W&B
    args = XConfig(**trainer_arguments(run, cfg.train))  # (checkpoints) before the model: under ZeRO-3 it loads partitioned
    backend, spec = load_model(...)                # the recipe's own model code (+ LoRA), on this process's device
    trainer = ...                                  # transformers/TRL Trainer: checkpoints, resume, DDP, DeepSpeed
    base = score_stage(run, "base", evaluate, spec.name, retain)  # base/ (+ base-<mode>/, retention/): before training
    callback = validation(run, evaluate, save_weights, val_mode, saved_parameters)
    fit(run, trainer, callbacks)                   # trainer.train: resumable, stopped cleanly by a signal
    final = score_stage(run, "test", evaluate, spec.name, retain)  # test/ (+ test-<mode>/): the selected checkpoint
    return finish(run, spec.name, base, final, trainer, callback, details)

The test split is scored before and after training and never drives selection; the validation
split does (``validation``). Everything is written through the run format (``unconfuse.eval.runs``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from accelerate import PartialState
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState

from unconfuse.eval.benchmarks import load_benchmark
from unconfuse.eval.folders import RunDirError, hold_folder, release_folder
from unconfuse.eval.io import atomic_folder, atomic_write_json
from unconfuse.eval.leakage import check_leakage
from unconfuse.eval.models import model_identity, resolve_model
from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.prompts import PromptSet, load_prompts
from unconfuse.eval.retention import RetentionSet, read_records, retention_block, summarize, write_records
from unconfuse.eval.runs import (RESULTS_FILE, RunFormatError, RunResults, read_run_results, read_scored, scored_folder,
                                 write_run_results, write_scored)
from unconfuse.eval.scorer import SCORER_VERSION
from unconfuse.eval.stopping import Stopped, deferred, signal_name
from unconfuse.eval.tracking import start_wandb_run, wandb_mode
from unconfuse.eval.world import prepare
from unconfuse.train.callbacks import (ConfigInCheckpoints, ConsoleLog, NonFiniteGuard, PairValidationCallback,
                                       StopOnSignal, better, latest)
from unconfuse.train.checkpoints import checkpoint_complete, checkpoint_step, latest_complete_checkpoint, no_space_error
from unconfuse.train.config import ConfigError, dump_config, to_dict
from unconfuse.train.distributed import gathered, launch_settings
from unconfuse.train.replay import describe_replay, replay_per_batch
from unconfuse.train.run_data import check_run_images, check_toy_data, replay_set, retention_sets
from unconfuse.train.warm_start import check_init_adapters

Evaluate = Callable[[Benchmark, str], "tuple[list[dict[str, Any]], dict[str, Any]]"]
Retain = Callable[[RetentionSet], "list[dict[str, Any]]"]  # retention records of the model as it is now


class AlreadyFinished(Exception):
    """A rerun of a run that finished (its results.json is there): nothing to train or score."""

    def __init__(self, run_dir: Path, results: RunResults):
        super().__init__(f"{run_dir}: finished before")
        self.run_dir, self.results = run_dir, results


ATTEMPTS_FILE = "attempts.json"  # {"attempts": n, "time_s": compute time of the attempts so far}


@dataclass
class Run:
    """An open run: where it writes, what it trains, validates and tests on, how it reports."""

    recipe: str
    cfg: Any  # the recipe's config dataclass (model, data, train, report_to, ... fields)
    strategy: str
    dir: Path
    is_main: bool  # rank 0 writes; every rank trains and scores
    train: Benchmark
    val: Benchmark
    test: Benchmark
    prompts: PromptSet
    launch: dict[str, Any]
    modes: list[str]  # test modes; the first is the main mode (base/, test/)
    retention: RetentionSet | None = None  # held-out single-image questions scored before and after (data.retention)
    val_retention: RetentionSet | None = None  # the validation side's, for selection with a retention floor
    replay: RetentionSet | None = None  # general data mixed into every batch (data.replay)
    init_adapters: Path | None = None  # the adapters the run starts from (init_adapters: checked, resolved)
    wandb: Any = None  # rank 0's W&B run (report_to: wandb), else None
    start: float = field(default_factory=time.time)
    attempt: int = 1  # this attempt's number: 1, then one more per rerun that resumed
    earlier_time_s: float = 0.0  # compute time of the earlier attempts (stopped by a signal or finished scoring)

    @property
    def total_time_s(self) -> float:
        return self.earlier_time_s + time.time() - self.start

    def save_attempt(self) -> None:
        """``attempts.json``: how many attempts this run took and their compute time so far (a rerun adds to it;
        an attempt killed outright, SIGKILL, is counted but its time is lost)."""
        if self.is_main:
            atomic_write_json(self.dir / ATTEMPTS_FILE, {"attempts": self.attempt, "time_s": round(self.total_time_s, 3)})

    @property
    def main_mode(self) -> str:
        return self.modes[0]

    @property
    def best_dir(self) -> Path:
        return self.dir / "checkpoints" / "best"

    def replay_rows(self, rows: list) -> list:
        """``rows``, the recipe's replay rows, after printing what the run replays (the main process)."""
        if self.is_main and rows:
            print(describe_replay(self.replay.name, len(rows), self.replay_per_batch, 2 * self.cfg.train.pairs_per_batch),
                  flush=True)
        return rows

    @property
    def replay_per_batch(self) -> int:
        """Replay items per training batch beside its ``2 * pairs_per_batch`` pair items (0 without replay)."""
        return replay_per_batch(self.cfg.data.replay_fraction, 2 * self.cfg.train.pairs_per_batch) if self.replay else 0


def open_run(recipe: str, cfg: Any, strategy: str, modes: list[str]) -> Run:
    """The first step of every recipe: launch state (before any model loads), the run directory with
    ``config.yaml``, the train/val/test benchmarks (the embedded world built on first use), the retention and
    replay sets, the warm start's check (``init_adapters``) and the leakage audit (``leakage.json``: training
    and replay images against val, test and retention; a leak aborts unless ``allow_leakage``), then rank 0's W&B
    run (``report_to: wandb``)."""
    check_toy_data(cfg)
    resume = cfg.resume_from_checkpoint
    if resume not in ("auto", "latest") and not checkpoint_complete(Path(resume)):
        raise ConfigError(f"resume_from_checkpoint: {resume}: not a complete checkpoint folder (no trainer_state.json "
                          f"or weights); auto resumes from the run's newest complete one")
    launch = launch_settings()  # the distributed state exists before any model loads
    with PartialState().main_process_first():  # one process builds the world and tiny models, the others wait
        prepare(models=[cfg.model], benchmarks=[cfg.data.train, cfg.data.val, cfg.data.test])
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(recipe)
    is_main = int(os.environ.get("RANK", "0")) == 0  # set by torchrun/accelerate for every process
    train_bench, val_bench, test_bench = (load_benchmark(a) for a in (cfg.data.train, cfg.data.val, cfg.data.test))
    retention, val_retention = retention_sets(cfg, test_bench, val_bench)
    replay = replay_set(cfg, train_bench)
    check_run_images({"data.train": train_bench, "data.val": val_bench, "data.test": test_bench,
                      "data.retention": retention, "data.val_retention": val_retention, "data.replay": replay})
    init, init_identity = None, None
    if getattr(cfg, "init_adapters", None):
        init, init_identity = check_init_adapters(cfg.init_adapters, cfg.model, train_bench)
    own_run_dir(recipe, cfg, run_dir, (train_bench, val_bench, test_bench), is_main,
                {"retention": retention.fingerprint() if retention else None,
                 "val_retention": val_retention.fingerprint() if val_retention else None,
                 **({"replay": replay.fingerprint()} if replay else {}),
                 **({"init_adapters": init_identity} if init else {})})
    if (run_dir / RESULTS_FILE).exists():
        try:
            results = read_run_results(run_dir)
        except RunFormatError as exc:
            release_folder(run_dir)
            raise RunFormatError(f"{exc}; --force starts the run afresh (the old contents are moved aside)") from None
        release_folder(run_dir)
        raise AlreadyFinished(run_dir, results)
    attempts = read_attempts(run_dir)
    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
    check_leakage(run_dir, train_bench, {"val": val_bench, "test": test_bench}, cfg.allow_leakage, write=is_main,
                  held_out={"retention": retention, "val_retention": val_retention}, replay=replay)
    run = Run(recipe, cfg, strategy, run_dir, is_main, train_bench, val_bench, test_bench, load_prompts(), launch,
              list(dict.fromkeys(modes)), retention, val_retention, replay, init,
              wandb=start_wandb(recipe, cfg, strategy, run_dir, is_main),  # before the trainer arguments: they log to it
              attempt=attempts["attempts"] + 1, earlier_time_s=attempts["time_s"])
    run.save_attempt()
    return run


def read_attempts(run_dir: Path) -> dict[str, Any]:
    """``attempts.json`` of an owned run folder (none yet: no attempt); an unreadable one is a RunDirError."""
    path = run_dir / ATTEMPTS_FILE
    if not path.exists():
        return {"attempts": 0, "time_s": 0.0}
    try:
        data = json.loads(path.read_text())
        return {"attempts": int(data["attempts"]), "time_s": float(data["time_s"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc}); --force starts the run afresh") from None


def own_run_dir(recipe: str, cfg: Any, run_dir: Path, benches: tuple[Benchmark, ...], is_main: bool,
                extra_data: dict[str, Any] | None = None) -> None:
    """Take ``run_dir`` for this run until the process ends (``unconfuse.eval.folders.owned_folder``): a
    second writer is refused; a folder holding another run (other settings, model or data content) is
    refused unless ``force``; the same run resumes. Settings that do not change what is computed
    (where it is written, resuming, logging, forcing) are not part of the fingerprint."""
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("output_dir", "resume_from_checkpoint", "report_to", "force")}
    fingerprint = {"command": f"train {recipe}", "settings": settings, "model": model_identity(resolve_model(cfg.model)),
                   "data": {**{split: bench.fingerprint() for split, bench in zip(("train", "val", "test"), benches)},
                            **(extra_data or {})}}
    # held until finish() or the process ends: the run owns its folder for its whole life
    hold_folder(run_dir, fingerprint, force=cfg.force, what=f"{recipe} run", writer=is_main)


def default_output_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------------------------------
# Scoring, validation, training


@dataclass
class Stage:
    """The test side scored at one stage (``base`` before training, ``test`` after): the scores of every test mode,
    and the retention records (None without a retention set)."""

    scores: dict[str, dict[str, Any]]
    retention: list[dict[str, Any]] | None = None

    def __getitem__(self, mode: str) -> dict[str, Any]:
        return self.scores[mode]


def score_stage(run: Run, stage: Literal["base", "test"], evaluate: Evaluate, model: str,
                retain: Retain | None = None) -> Stage:
    """The test split in every test mode: ``<stage>/`` for the main mode, ``<stage>-<mode>/`` for the
    others; and, with ``retain`` and a retention set, the retention questions (``retention/<stage>.jsonl``).
    Base scores already on disk are reused (a resumed run does not score its base twice);
    test scores are always computed, with the checkpoint ``evaluate`` holds."""
    kept = retention_stage(run, stage, retain) if run.retention is not None and retain is not None else None
    scores = {}
    for mode in run.modes:
        folder = run.dir / scored_folder(stage, mode, run.main_mode)
        if stage == "base" and (folder / "results.json").exists():
            scores[mode] = read_scored(folder)
            continue
        records, scores[mode] = evaluate(run.test, mode)
        if run.is_main:
            scores[mode] = write_scored(folder, scores[mode], records=records, model=model, mode=mode,
                                        benchmark=run.cfg.data.test, strategy="base" if stage == "base" else run.strategy,
                                        seed=run.cfg.train.seed, benchmark_fingerprint=run.test.fingerprint(),
                                        title=f"{run.recipe} {stage}: {model} / {mode}")
    return Stage(scores, kept)


def retention_stage(run: Run, stage: str, retain: Retain) -> list[dict[str, Any]]:
    """The retention records of ``stage`` (``retention/<stage>.jsonl``; the base's are reused on resume)."""
    path = run.dir / "retention" / f"{stage}.jsonl"
    if stage == "base" and path.exists():
        return read_records(path)
    records = retain(run.retention)
    if run.is_main:
        write_records(path, records)
        numbers = ", ".join(f"{name} {v['value']:.1f} [{v['ci'][0]:.1f}, {v['ci'][1]:.1f}]"
                            for name, v in summarize(records).items())
        print(f"retention {stage} ({run.retention.name}, {retention_mode(run)}): {numbers}", flush=True)
    return records


def retention_mode(run: Run) -> str:
    """How retention is scored: the MLLM recipes' ``data.retention_mode``; encoders: zero-shot and retrieval."""
    return getattr(run.cfg.data, "retention_mode", "clip")


def validation(run: Run, evaluate: Evaluate, save_weights: Callable[[Path], None], val_mode: str,
               saved_parameters: Callable[[], Any] = list, retain: Retain | None = None) -> PairValidationCallback:
    """The validation loop: scores ``run.val`` in ``val_mode`` at step 0 and every ``eval_steps``, keeps
    the best checkpoint in ``checkpoints/best`` (written atomically, with the config and step), logs
    ``val/*`` to W&B, stops after ``patience`` evaluations without improvement. ``saved_parameters()``
    are the parameters ``save_weights`` writes: under ZeRO-3 every process gathers them, the main one writes."""
    def save_best(step: int) -> None:
        with gathered(saved_parameters()):
            if run.is_main:
                with atomic_folder(run.best_dir) as tmp:
                    save_weights(tmp)
                    dump_config(run.cfg, tmp / "config.yaml")
                    (tmp / "step.txt").write_text(str(step))

    def evaluate_val() -> dict[str, Any]:
        metrics = dict(evaluate(run.val, val_mode)[1])
        if run.val_retention is not None:
            summary = summarize(retain(run.val_retention))
            metrics["retention"] = summary["accuracy" if "accuracy" in summary else "retrieval_r1"]["value"]
        return metrics

    if run.val_retention is not None and retain is None:
        raise ConfigError(f"train.selection: {run.cfg.train.selection} is not supported by {run.recipe}")
    floor = run.cfg.train.retention_floor if run.val_retention is not None else None
    return PairValidationCallback(run.dir, evaluate_val, save_best, run.cfg.train.eval_steps,
                                  run.cfg.train.patience, is_main=run.is_main,
                                  log=(lambda row: run.wandb.log(row)) if run.wandb else None, retention_floor=floor,
                                  prefer=latest if run.cfg.train.selection == "last" else better)


def fit(run: Run, trainer, callbacks: Sequence[Any] = ()) -> None:
    """``trainer.train``, resuming from ``resume_from_checkpoint`` (``auto``/``latest``: the newest complete
    checkpoint of the run, if any; or a folder). A run whose checkpoint already holds ``max_steps`` (killed
    while it scored the test) trains nothing more: the Trainer's state is read back from it. A SIGTERM or
    SIGINT under ``graceful_stop`` ends the current step, saves it and raises ``Stopped``."""
    trainer.add_callback(NonFiniteGuard(lambda: getattr(trainer, "_tr_loss", None),  # the loss summed since the last log
                                        hint=f"train.learning_rate={run.cfg.train.learning_rate:g} too high?"))
    trainer.add_callback(ConfigInCheckpoints(run.cfg, run.is_main))
    for raw in (PrinterCallback, ProgressCallback):  # raw-dict printers: ConsoleLog prints readable lines
        trainer.remove_callback(raw)
    trainer.add_callback(ConsoleLog())
    stop = StopOnSignal()
    trainer.add_callback(stop)
    for callback in callbacks:  # the caller's, after the run's own
        trainer.add_callback(callback)
    resume = run.cfg.resume_from_checkpoint
    if resume in ("auto", "latest"):
        resume = latest_complete_checkpoint(run.dir / "checkpoints", quiet=resume == "auto")
    if resume and checkpoint_step(resume) >= run.cfg.train.max_steps:
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        if run.is_main:
            print(f"{resume}: training finished ({trainer.state.global_step} steps); scoring what is missing", flush=True)
        return
    if resume and run.is_main:
        print(f"resuming from {resume}", flush=True)
    try:
        with deferred():
            trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:
        full = no_space_error(exc, run.dir)
        if full is None:
            raise
        raise full from None
    trainer.accelerator.wait_for_everyone()  # rank 0 may still be writing the best weights
    if stop.stopped_at is not None:
        run.save_attempt()
        raise Stopped(stop.signum, f"stopped by {signal_name(stop.signum)} at step {stop.stopped_at}; "
                                   f"checkpoint-{stop.stopped_at} saved in {run.dir / 'checkpoints'}; "
                                   f"rerun the same command to resume")


def finish(run: Run, model: str, base: Stage, final: Stage, trainer, callback: PairValidationCallback,
           details: dict[str, Any] | None = None) -> RunResults:
    """The run record (``results.json``) from the base and final stages, and the W&B summary of the test scores."""
    main = run.main_mode
    if run.wandb is not None and not run.wandb.offline:  # the model card links it
        details = {**(details or {}), "wandb_url": run.wandb.url}
    results = RunResults(
        kind="run", recipe=run.recipe, strategy=run.strategy, model=model, train_data=run.cfg.data.train,
        test_data=run.cfg.data.test, seed=run.cfg.train.seed, mode=main, base=base[main], final=final[main],
        steps=trainer.state.global_step, best_step=callback.state.best_step, best_val=callback.state.best,
        wall_time_s=run.total_time_s, attempts=run.attempt, scorer_version=SCORER_VERSION, prompt_version=run.prompts.version,
        other_modes={m: {"base": base[m], "final": final[m]} for m in run.modes if m != main}, details=details or {},
        retention=(retention_block(run.retention, retention_mode(run), base.retention, final.retention)
                   if base.retention is not None and final.retention is not None else None))
    run.save_attempt()
    if run.is_main:
        write_run_results(run.dir, results)
        log_final_to_wandb(run.wandb, results, run.dir / "test" / "predictions.jsonl")
    release_folder(run.dir)
    return results


def summary(results: RunResults) -> str:
    """One JSON line: strategy, steps, best step, and base/final set accuracy and confusion per mode."""
    line: dict[str, Any] = {"strategy": results.strategy, "best_step": results.best_step, "steps": results.steps}
    for mode in [results.mode, *results.other_modes]:
        base, final = results.scores(mode)
        for name, res in (("base", base), ("final", final)):
            line |= {f"{name}_{mode}_{m}": res[m] for m in ("set_accuracy", "confusion")}
    if results.retention:
        headline = results.retention["metrics"][results.retention["headline"]]
        line |= {"retention_before": headline["before"], "retention_after": headline["after"],
                 "retention_diff_ci": headline["diff_ci"]}
    return json.dumps(line)


# ---------------------------------------------------------------------------------------------
# W&B


def start_wandb(recipe: str, cfg: Any, strategy: str, run_dir: Path, is_main: bool):
    """Rank 0's W&B run when ``report_to: wandb`` (grouped by strategy; ``unconfuse.eval.tracking``: offline without
    an API key), else None."""
    if cfg.report_to != "wandb" or wandb_mode() == "disabled" or not is_main:
        return None
    return start_wandb_run(run_dir.name, str(run_dir), group=strategy, tags=[recipe, str(cfg.model), cfg.data.train],
                           config=to_dict(cfg), reinit="finish_previous")


def log_final_to_wandb(wandb_run, results: RunResults, predictions: Path) -> None:
    if wandb_run is None:
        return
    import wandb

    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    table = wandb.Table(columns=["pair_id", "image", "answer", "score_A", "score_B"],
                        data=[[r["pair_id"], r["image"], r.get("answer"), (r.get("scores") or {}).get("A"),
                               (r.get("scores") or {}).get("B")] for r in rows])
    wandb_run.log({"test/predictions": table})
    for name, res in (("base", results.base), ("final", results.final)):
        for key in ("set_accuracy", "confusion", "individual_accuracy", "invalid"):
            wandb_run.summary[f"test/{name}_{key}"] = res[key]
    for metric, numbers in ((results.retention or {}).get("metrics") or {}).items():
        for key in ("before", "after", "diff", "mcnemar_p"):
            wandb_run.summary[f"retention/{metric}_{key}"] = numbers[key]
    wandb_run.finish()
