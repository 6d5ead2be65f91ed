"""The run lifecycle every recipe shares, as steps a recipe calls in order (torchtune-style: no base
class, no mixins; each recipe file reads top to bottom)::

    run = open_run(RECIPE, cfg, strategy)          # launch state, run directory, config.yaml, data, leakage.json
    args = XConfig(**trainer_arguments(run, cfg.train))  # before the model: under ZeRO-3 it loads partitioned
    adapter, spec = load_model(...)                # the recipe's own model code (+ LoRA), on this process's device
    start_wandb(run, spec.name)
    trainer = ...                                  # transformers/TRL Trainer: checkpoints, resume, DDP, DeepSpeed
    base = score_stage(run, "base", evaluate)      # base/ (+ base-<mode>/): the test split before training
    callback = validation(run, evaluate, save_weights, val_mode, saved_parameters)
    train(run, trainer)
    final = score_stage(run, "test", evaluate)     # test/ (+ test-<mode>/): the selected checkpoint
    return finish(run, spec.name, base, final, trainer, callback, details)

The test split is scored before and after training and never drives selection; the validation
split does (``validation``). Everything is written through the run format (``unconfuse.eval.runs``).
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from unconfuse.eval.benchmarks import BenchmarkError, load_benchmark
from unconfuse.eval.io import RunDirError, atomic_folder, atomic_write_json, atomic_write_text, owned_folder, sha256_file
from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.prompts import PromptSet, load_prompts
from unconfuse.eval.retention import RetentionSet, load_retention, read_records, retention_block, summarize
from unconfuse.eval.runs import (RESULTS_FILE, RunFormatError, RunResults, read_run_results, read_scored, scored_folder,
                                 write_run_results, write_scored)
from unconfuse.eval.scorer import SCORER_VERSION
from unconfuse.train.callbacks import PairValidationCallback
from unconfuse.train.config import ConfigError, TrainSettings, dump_config, to_dict

Evaluate = Callable[[Benchmark, str], "tuple[list[dict[str, Any]], dict[str, Any]]"]
Retain = Callable[[RetentionSet], "list[dict[str, Any]]"]  # retention records of the model as it is now


class AlreadyFinished(Exception):
    """A rerun of a run that finished (its results.json is there): nothing to train or score."""

    def __init__(self, run_dir: Path, results: RunResults):
        super().__init__(f"{run_dir}: finished before")
        self.run_dir, self.results = run_dir, results


ATTEMPTS_FILE = "attempts.json"  # {"attempts": n, "time_s": compute time of the attempts so far}


class LeakageError(RuntimeError):
    """Training images appear in the validation or test pairs."""


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
    retention_records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> records
    start: float = field(default_factory=time.time)
    wandb: Any = None
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
        from unconfuse.train.replay import describe_replay

        if self.is_main and rows:
            print(describe_replay(self.replay.name, len(rows), self.replay_per_batch, 2 * self.cfg.train.pairs_per_batch),
                  flush=True)
        return rows

    @property
    def replay_per_batch(self) -> int:
        """Replay items per training batch beside its ``2 * pairs_per_batch`` pair items (0 without replay)."""
        from unconfuse.train.replay import replay_per_batch

        return replay_per_batch(self.cfg.data.replay_fraction, 2 * self.cfg.train.pairs_per_batch) if self.replay else 0


def open_run(recipe: str, cfg: Any, strategy: str, modes: list[str]) -> Run:
    """The first step of every recipe: launch state (before any model loads), the run directory with
    ``config.yaml``, the train/val/test benchmarks (the embedded world built on first use), the retention and
    replay sets, the warm start's check (``init_adapters``) and the leakage audit (``leakage.json``: training
    and replay images against val, test and retention; a leak aborts unless ``allow_leakage``)."""
    from unconfuse.eval.world import prepare

    check_toy_data(cfg)
    resume = cfg.resume_from_checkpoint
    if resume not in ("auto", "latest") and not checkpoint_complete(Path(resume)):
        raise ConfigError(f"resume_from_checkpoint: {resume}: not a complete checkpoint folder (no trainer_state.json "
                          f"or weights); auto resumes from the run's newest complete one")
    launch = launch_settings()  # the distributed state exists before any model loads
    from accelerate import PartialState

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
        from unconfuse.train.warm_start import check_init_adapters

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
            release_run_dir(run_dir)
            raise RunFormatError(f"{exc}; --force starts the run afresh (the old contents are moved aside)") from None
        release_run_dir(run_dir)
        raise AlreadyFinished(run_dir, results)
    attempts = read_attempts(run_dir)
    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
    check_leakage(run_dir, train_bench, {"val": val_bench, "test": test_bench}, cfg.allow_leakage, write=is_main,
                  held_out={"retention": retention, "val_retention": val_retention}, replay=replay)
    run = Run(recipe, cfg, strategy, run_dir, is_main, train_bench, val_bench, test_bench, load_prompts(), launch,
              list(dict.fromkeys(modes)), retention, val_retention, replay, init,
              attempt=attempts["attempts"] + 1, earlier_time_s=attempts["time_s"])
    run.save_attempt()
    return run


def check_run_images(sources: dict[str, ImageSource | None]) -> None:
    """Every image a run will read (pairs, retention and replay sets), decoded once before any model loads, as
    eval checks its benchmark: a missing or unreadable one is a BenchmarkError naming the setting, how many,
    and the first few."""
    from unconfuse.eval.images import check_images, image_problem

    for setting_name, source in sources.items():
        if source is None:
            continue
        if isinstance(source, Benchmark):
            problems = [str(problem) for problem in check_images(source)]
        else:
            first_item = {}  # each image once (a replay image carries several questions)
            for item in source.items:
                first_item.setdefault(str(source.resolve_image(item.image)), item.id)
            problems = [f"item {item_id}: {path}: {why}" for path, item_id in first_item.items()
                        for why in [image_problem(path)] if why]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise BenchmarkError(f"{setting_name}: {len(problems)} image(s) missing or unreadable: {shown}")


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


def replay_set(cfg: Any, train: Benchmark) -> RetentionSet | None:
    """The general data replayed in every batch (``data.replay``, ``data.replay_fraction``), or None."""
    from unconfuse.train.replay import check_fraction, load_replay, resolve_replay

    check_fraction(cfg.data.replay, cfg.data.replay_fraction)
    arg = resolve_replay(cfg.data.replay, train)
    return load_replay(arg) if arg else None


def resolve_retention(arg: str, bench_arg: str) -> str | None:
    """A ``data.retention`` / ``data.val_retention`` value as a retention argument: ``none`` -> None; ``auto`` ->
    the embedded world's questions on the images of ``bench_arg`` when it is a world split (``world:<split>`` or a
    world's split folder), else None (set it for real data: a JSONL file, a folder or ``hf:<id>``)."""
    if arg == "none":
        return None
    if arg != "auto":
        return arg
    text = str(bench_arg)
    if text.startswith("world:"):
        return text
    path = Path(text)
    candidate = path.parent / "retention" / f"{path.name}.jsonl"
    return str(candidate) if path.is_dir() and (path.parent / "world.json").exists() and candidate.exists() else None


def retention_set_for(arg: str, bench_arg: str, bench: Benchmark | None = None) -> RetentionSet | None:
    """A ``data.retention`` / ``data.val_retention`` value, loaded: ``none`` -> None; a set argument -> that set;
    ``auto`` -> the embedded world's questions on the images of the benchmark: its retention file for a world split
    (``world:<split>`` or a world's split folder), and for a file of world pairs (a cv fold) the world's questions
    on exactly that file's images, so each fold is measured on its own held-out images; None for other data."""
    resolved = resolve_retention(arg, bench_arg)
    if resolved is not None:
        return load_retention(resolved)
    if arg != "auto" or bench is None:
        return None
    from unconfuse.train.replay import world_root_of

    root = world_root_of(bench)
    if root is None:
        return None
    images = {str(bench.resolve_image(ref).resolve()) for ref in bench.unique_images()}
    items = []
    for path in sorted((root / "retention").glob("*.jsonl")):
        questions = load_retention(path)
        items += [item for item in questions.items if str(questions.resolve_image(item.image).resolve()) in images]
    return RetentionSet(items, root / "retention", f"world questions on {bench.name}") if items else None


def retention_sets(cfg: Any, test: Benchmark | None = None, val: Benchmark | None = None
                   ) -> tuple[RetentionSet | None, RetentionSet | None]:
    """The retention set scored before and after training (``data.retention``, on the test side: ``test``'s images
    with ``auto``) and, when the validation loop selects with a retention floor, the validation side's
    (``data.val_retention``)."""
    test_set = retention_set_for(cfg.data.retention, cfg.data.test, test)
    val_set = None
    if cfg.train.selection == "set_accuracy_with_retention_floor":
        val_set = retention_set_for(cfg.data.val_retention, cfg.data.val, val)
        if val_set is None:
            raise ConfigError("train.selection: set_accuracy_with_retention_floor needs retention questions held out on the "
                              f"validation side; data.val_retention={cfg.data.val_retention!r} gives none for "
                              f"data.val={cfg.data.val!r} (auto finds them for the embedded world only)")
        if test_set is not None and val_set.fingerprint() == test_set.fingerprint():
            raise ConfigError("data.val_retention: the same retention set as data.retention; the test side never drives selection")
    return test_set, val_set


def own_run_dir(recipe: str, cfg: Any, run_dir: Path, benches: tuple[Benchmark, ...], is_main: bool,
                extra_data: dict[str, Any] | None = None) -> None:
    """Take ``run_dir`` for this run until the process ends (``unconfuse.eval.io.owned_folder``): a
    second writer is refused; a folder holding another run (other settings, model or data content) is
    refused unless ``force``; the same run resumes. Settings that do not change what is computed
    (where it is written, resuming, logging, forcing) are not part of the fingerprint."""
    from contextlib import ExitStack

    from unconfuse.eval.models import model_identity, resolve_model

    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("output_dir", "resume_from_checkpoint", "report_to", "force")}
    fingerprint = {"command": f"train {recipe}", "settings": settings, "model": model_identity(resolve_model(cfg.model)),
                   "data": {**{split: bench.fingerprint() for split, bench in zip(("train", "val", "test"), benches)},
                            **(extra_data or {})}}
    release_run_dir(run_dir)  # this process ran here before (an in-process retry): own it afresh
    stack = ExitStack()  # held until finish() or the process ends: the run owns its folder for its whole life
    stack.enter_context(owned_folder(run_dir, fingerprint, force=cfg.force, what=f"{recipe} run", writer=is_main))
    _OWNED[str(run_dir.resolve())] = stack


_OWNED: dict[str, Any] = {}  # run directories this process owns -> the open lock


def release_run_dir(run_dir: Path) -> None:
    stack = _OWNED.pop(str(run_dir.resolve()), None)
    if stack is not None:
        stack.close()


def check_toy_data(cfg: Any, benchmark: str | None = None) -> None:
    """A real model (anything but a preset built from config) on the embedded world's 64-px toy
    images measures nothing about it: refused unless ``allow_toy_data``. ``benchmark``: the benchmark a cv
    folds into the config's data (its folds are files, so the data keys alone would not show the world)."""
    from unconfuse.eval.models import find_preset, resolve_model

    preset = find_preset(cfg.model)
    if preset is None and "/" not in str(cfg.model) and not Path(cfg.model).exists():
        resolve_model(cfg.model)  # an unknown name: its one-line error lists the presets
    toy = [f"data.{k}" for k in ("train", "val", "test") if str(getattr(cfg.data, k)).startswith("world:")]
    toy += ["--benchmark"] if str(benchmark or "").startswith("world:") else []
    if toy and not cfg.allow_toy_data and not (preset is not None and preset.build):
        raise ConfigError(f"{', '.join(toy)}: the embedded world's 64-px toy images, with the real model {cfg.model!r}; "
                          "point data.* at held-out real pairs (unconfuse mine, or unconfuse cv on MediConfusion) "
                          "or set allow_toy_data: true")


def default_output_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def launch_settings() -> dict[str, Any]:
    """TrainingArguments settings for how this process was launched (plain, DDP, or DeepSpeed via
    accelerate). On CPU + DeepSpeed, accelerate leaves the process group unset: create it with
    gloo here and tell the Trainer to use it (``use_configured_state``)."""
    import torch

    deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else None
    cpu = not torch.cuda.is_available()
    if deepspeed and cpu:
        from accelerate import PartialState

        PartialState(backend="gloo")
    return {"deepspeed": deepspeed, "use_cpu": cpu,
            "accelerator_config": {"use_configured_state": True} if deepspeed and cpu else None}


def process_device() -> str:
    """This process's own device under any launch (``cuda:<local rank>`` with several GPUs, else
    ``cuda`` or ``cpu``): each rank loads its model there, never all on GPU 0."""
    from accelerate import PartialState

    return str(PartialState().device)


def trainer_arguments(run: Run, train: TrainSettings, model_width: int | None = None) -> dict[str, Any]:
    """TrainingArguments keywords from the shared training settings, the run directory and the launch.
    ``model_width``: for models without a transformers config (open_clip), the width DeepSpeed's ``auto``
    bucket sizes are computed from, as transformers computes them from ``config.hidden_size``."""
    launch = dict(run.launch)
    if launch["deepspeed"] and model_width:
        launch["deepspeed"] = deepspeed_config_for_width(launch["deepspeed"], model_width)
    return dict(output_dir=str(run.dir / "checkpoints"), max_steps=train.max_steps,
                per_device_train_batch_size=2 * train.pairs_per_batch, learning_rate=train.learning_rate,
                weight_decay=train.weight_decay, warmup_steps=train.warmup_steps, lr_scheduler_type=train.lr_scheduler,
                gradient_accumulation_steps=train.gradient_accumulation_steps, max_grad_norm=train.max_grad_norm,
                logging_steps=train.logging_steps, save_strategy="steps", save_steps=train.save_steps,
                save_total_limit=train.save_total_limit, seed=train.seed,
                data_seed=train.seed, bf16=train.bf16, activation_checkpointing=train.activation_checkpointing, report_to=["wandb"] if run.wandb is not None else [],
                dataloader_num_workers=0, disable_tqdm=True, logging_nan_inf_filter=False,  # NonFiniteGuard stops instead
                **launch)  # ConsoleLog shows progress


def deepspeed_config_for_width(path: str, width: int) -> dict[str, Any]:
    """The DeepSpeed config at ``path`` with its width-based ``auto`` ZeRO settings filled in (transformers'
    own rule: reduce bucket width^2, ZeRO-3 prefetch bucket 0.9 width^2, persistence threshold 10 width)."""
    config = json.loads(Path(path).read_text())
    zero = config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", width * width), ("stage3_prefetch_bucket_size", int(0.9 * width * width)),
                       ("stage3_param_persistence_threshold", 10 * width)):
        if zero.get(key) == "auto":
            zero[key] = value
    return config


# ---------------------------------------------------------------------------------------------
# Leakage


ImageSource = Benchmark | RetentionSet  # pairs, or single images (retention and replay sets)


def _image_paths(source: ImageSource) -> dict[str, str]:
    """Resolved path -> reference of every image of a benchmark or a retention/replay set, each once."""
    refs = source.unique_images() if isinstance(source, Benchmark) else dict.fromkeys(item.image for item in source.items)
    return {str(source.resolve_image(ref).resolve()): ref for ref in refs}


def leakage_audit(train: ImageSource, others: dict[str, ImageSource], phash_distance: int = 4,
                  decoded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training images found in the other splits: by resolved path, by file bytes (sha256) and by decoded
    pixels (a re-encoded copy has other bytes, the same pixels): each one a leak. Near-duplicates by
    perceptual hash (Hamming distance <= ``phash_distance``, as mining uses) are reported, not a leak:
    similar scans of different patients are common. ``decoded``: path -> (pixel digest, phash), shared by
    audits of the same images (each image is decoded once)."""
    import imagehash
    import numpy as np

    from unconfuse.eval.images import UnreadableImage, decode_image, pixel_digest

    decoded = {} if decoded is None else decoded

    def pixels(path: str) -> tuple[str, np.ndarray] | None:
        """(pixel digest, packed 64-bit phash), or None for a file that does not decode (the image check names it)."""
        if path not in decoded:
            try:
                image = decode_image(path)
                decoded[path] = (pixel_digest(image), np.packbits(imagehash.phash(image).hash.flatten()))
            except UnreadableImage:
                decoded[path] = None
        return decoded[path]

    def file_hash(path: str) -> str | None:
        return sha256_file(path) if Path(path).is_file() else None  # a FIFO would block the read

    train_paths = _image_paths(train)
    train_hashes = {file_hash(p) for p in train_paths} - {None}
    train_pixels = {d[0]: p for p in train_paths if (d := pixels(p)) is not None}
    phash_paths = [p for p in train_paths if pixels(p) is not None]
    train_phash = np.stack([pixels(p)[1] for p in phash_paths]) if phash_paths else np.zeros((0, 8), np.uint8)
    report: dict[str, Any] = {"train_images": len(train_paths), "phash_distance": phash_distance, "splits": {}}
    for name, bench in others.items():
        paths = _image_paths(bench)
        by_id = sorted(set(paths) & set(train_paths))
        by_hash = sorted(p for p in paths if p not in train_paths and file_hash(p) in train_hashes)
        by_pixels, near = [], []
        for p in sorted(set(paths) - set(train_paths) - set(by_hash)):
            d = pixels(p)
            if d is None:
                continue
            if d[0] in train_pixels:
                by_pixels.append(p)
            elif len(train_phash):
                distances = np.bitwise_count(np.bitwise_xor(train_phash, d[1])).sum(axis=1)
                nearest = int(distances.argmin())
                if distances[nearest] <= phash_distance:
                    near.append({"image": p, "train_image": phash_paths[nearest], "distance": int(distances[nearest])})
        report["splits"][name] = {"images": len(paths), "shared_by_id": by_id, "shared_by_content": by_hash,
                                  "shared_by_pixels": by_pixels, "near_duplicates_phash": near}
    report["leak"] = any(v["shared_by_id"] or v["shared_by_content"] or v["shared_by_pixels"]
                         for v in report["splits"].values())
    return report


def _shared(report: dict[str, Any]) -> dict[str, int]:
    return {k: len(v["shared_by_id"]) + len(v["shared_by_content"]) + len(v["shared_by_pixels"])
            for k, v in report["splits"].items()}


def check_leakage(run_dir: Path, train: Benchmark, others: dict[str, Benchmark], allow: bool, write: bool = True,
                  held_out: dict[str, RetentionSet | None] | None = None, replay: RetentionSet | None = None) -> dict[str, Any]:
    """Write ``leakage.json``; abort before training on a leak unless ``allow``. The training pairs are audited
    against ``others`` (val, test) and the ``held_out`` retention sets; the ``replay`` set, when there is one,
    against all of them (its own section, ``replay``: general data must not hold an image the run is judged on)."""
    held = {name: rset for name, rset in (held_out or {}).items() if rset is not None}
    decoded: dict[str, Any] = {}  # the judged images are decoded once for both audits
    report = leakage_audit(train, {**others, **held}, decoded=decoded)
    if replay is not None:
        report["replay"] = leakage_audit(replay, {**others, **held}, decoded=decoded)
        report["leak"] = report["leak"] or report["replay"]["leak"]
    report["allowed"] = allow
    if write:
        atomic_write_json(run_dir / "leakage.json", report)
    if report["leak"] and not allow:
        where = [f"training images appear in other splits {_shared(report)}"] if any(_shared(report).values()) else []
        if replay is not None and report["replay"]["leak"]:
            where.append(f"replay images (data.replay) appear in {_shared(report['replay'])}")
        raise LeakageError(f"{'; '.join(where)}; see {run_dir / 'leakage.json'} (set allow_leakage: true to train anyway)")
    return report


# ---------------------------------------------------------------------------------------------
# Scoring, validation, training


def score_stage(run: Run, stage: Literal["base", "test"], evaluate: Evaluate, model: str,
                retain: Retain | None = None) -> dict[str, dict[str, Any]]:
    """The test split in every test mode: ``<stage>/`` for the main mode, ``<stage>-<mode>/`` for the
    others; and, with ``retain`` and a retention set, the retention questions (``retention/<stage>.jsonl``).
    Base scores already on disk are reused (a resumed run does not score its base twice);
    test scores are always computed, with the checkpoint ``evaluate`` holds."""
    if run.retention is not None and retain is not None:
        run.retention_records[stage] = retention_stage(run, stage, retain)
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
    return scores


def retention_stage(run: Run, stage: str, retain: Retain) -> list[dict[str, Any]]:
    """The retention records of ``stage`` (``retention/<stage>.jsonl``; the base's are reused on resume)."""
    path = run.dir / "retention" / f"{stage}.jsonl"
    if stage == "base" and path.exists():
        return read_records(path)
    records = retain(run.retention)
    if run.is_main:
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
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
                                  log=(lambda row: run.wandb.log(row)) if run.wandb else None, retention_floor=floor)


@contextmanager
def gathered(parameters, modifier_rank: int | None = None):
    """Whole ``parameters`` on every process for the block, where DeepSpeed ZeRO-3 shards them (with
    ``modifier_rank``, that process's changes are written back to the shards); nothing otherwise.
    Every process must enter it: gathering is collective."""
    sharded = [p for p in parameters if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield


@contextmanager
def whole_weights(trainer=None):
    """Whole weights on every process for a scoring pass, so that each process can score its own share
    of the pairs: under ZeRO-3 the trainer's shards are gathered and DeepSpeed's hooks lifted for the pass
    (what TRL's ``unwrap_model_for_generation`` does for generation, with TRL's hook helpers); nothing otherwise."""
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer is not None and trainer.is_deepspeed_enabled else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    engine = trainer.model_wrapped  # the DeepSpeed engine once training started, else the model (no hooks yet)
    with deepspeed.zero.GatheredParameters(list(engine.parameters())):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)


def train(run: Run, trainer) -> None:
    """``trainer.train``, resuming from ``resume_from_checkpoint`` (``auto``/``latest``: the newest complete
    checkpoint of the run, if any; or a folder). A run whose checkpoint already holds ``max_steps`` (killed
    while it scored the test) trains nothing more: the Trainer's state is read back from it. A SIGTERM or
    SIGINT under ``graceful_stop`` ends the current step, saves it and raises ``Stopped``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState

    from unconfuse.eval.stopping import Stopped, deferred, signal_name
    from unconfuse.train.callbacks import ConfigInCheckpoints, ConsoleLog, NonFiniteGuard, StopOnSignal

    trainer.add_callback(NonFiniteGuard(lambda: getattr(trainer, "_tr_loss", None),  # the loss summed since the last log
                                        hint=f"train.learning_rate={run.cfg.train.learning_rate:g} too high?"))
    trainer.add_callback(ConfigInCheckpoints(run.cfg, run.is_main))
    for raw in (PrinterCallback, ProgressCallback):  # raw-dict printers: ConsoleLog prints readable lines
        trainer.remove_callback(raw)
    trainer.add_callback(ConsoleLog())
    stop = StopOnSignal()
    trainer.add_callback(stop)
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


LOW_SPACE = 256 * 2**20  # bytes: below this, a failed torch/safetensors write is taken for a full disk


def no_space_error(exc: BaseException, folder: Path) -> RunDirError | None:
    """A one-line RunDirError naming ``folder`` and its free space when ``exc`` (or what caused it) is a full disk;
    None otherwise. torch.save (``inline_container``) and safetensors hide the ENOSPC behind their own errors:
    those count when the folder's disk has less than ``LOW_SPACE`` free."""
    import shutil

    def free_space() -> int:  # asked only of errors that may hide a full disk
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        return shutil.disk_usage(existing).free

    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        full = (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "No space left" in text
        hidden = "inline_container" in text or type(seen).__name__ == "SafetensorError"
        if full or hidden:
            free = free_space()
            if full or free < LOW_SPACE:
                return RunDirError(f"no space left on the disk of {folder} ({free / 2**20:.0f} MB free): free some and "
                                   f"rerun the same command (it resumes from the last complete checkpoint)")
        seen = seen.__cause__ or seen.__context__
    return None


def checkpoint_step(folder: str | Path) -> int:
    """The optimizer steps a checkpoint holds (its trainer_state.json's ``global_step``)."""
    return int(json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"])


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_complete(folder: Path) -> bool:
    """Whether a save of ``folder`` finished: trainer_state.json (the Trainer writes it last) parses, and
    the weights are there (a weights file, every shard of an index, or DeepSpeed's ``global_step*``)."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if any((folder / name).is_file() for name in WEIGHT_FILES) or any(p.is_dir() for p in folder.glob("global_step*")):
        return True
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if shards and all((folder / shard).is_file() for shard in shards):
            return True
    return False


def latest_complete_checkpoint(folder: Path, quiet: bool = False) -> str | None:
    """``resume_from_checkpoint: auto`` / ``latest``: the newest complete ``checkpoint-N`` of ``folder`` (a save
    killed half-way leaves an incomplete one, skipped with a note); None, training from the start, when there is
    none (said unless ``quiet`` and there is no checkpoint at all: a fresh run)."""
    numbered = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                      key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for candidate in numbered:
        if checkpoint_complete(candidate):
            return str(candidate)
        print(f"resume_from_checkpoint: skipping {candidate} (incomplete: a save did not finish)", file=sys.stderr)
    if numbered or not quiet:
        print(f"resume_from_checkpoint: no complete checkpoint in {folder}; training from the start", file=sys.stderr)
    return None


def finish(run: Run, model: str, base: dict[str, dict[str, Any]], final: dict[str, dict[str, Any]], trainer,
           callback: PairValidationCallback, details: dict[str, Any] | None = None) -> RunResults:
    """The run record (``results.json``), and the W&B summary of the test scores."""
    main = run.main_mode
    results = RunResults(
        kind="run", recipe=run.recipe, strategy=run.strategy, model=model, train_data=run.cfg.data.train,
        test_data=run.cfg.data.test, seed=run.cfg.train.seed, mode=main, base=base[main], final=final[main],
        steps=trainer.state.global_step, best_step=callback.state.best_step, best_val=callback.state.best,
        wall_time_s=run.total_time_s, attempts=run.attempt, scorer_version=SCORER_VERSION, prompt_version=run.prompts.version,
        other_modes={m: {"base": base[m], "final": final[m]} for m in run.modes if m != main}, details=details or {},
        retention=(retention_block(run.retention, retention_mode(run), run.retention_records["base"], run.retention_records["test"])
                   if {"base", "test"} <= set(run.retention_records) else None))
    run.save_attempt()
    if run.is_main:
        write_run_results(run.dir, results)
        log_final_to_wandb(run.wandb, results, run.dir / "test" / "predictions.jsonl")
    release_run_dir(run.dir)
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


def start_wandb(run: Run, model: str) -> None:
    """Start a W&B run for rank 0 (project ``unconfuse``, grouped by strategy) when ``report_to: wandb``.

    Without an API key (and no WANDB_MODE set) the run is offline: it never blocks on the
    network. API keys are read by wandb from the environment and never written by us.
    """
    if run.cfg.report_to != "wandb" or os.environ.get("WANDB_MODE") == "disabled" or not run.is_main:
        return
    import wandb

    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_PROJECT", "unconfuse")
    run.wandb = wandb.init(project=os.environ["WANDB_PROJECT"], group=run.strategy, tags=[run.recipe, model, run.cfg.data.train],
                           config=to_dict(run.cfg), dir=str(run.dir), name=run.dir.name, reinit="finish_previous")


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


# ---------------------------------------------------------------------------------------------
# Entry points


def run_recipe(recipe: str, config: str | Path | None, overrides: list[str] | None = None) -> RunResults:
    """Run recipe ``recipe`` (from ``recipes.RECIPES``) in this process with a YAML config and dotted
    overrides; its run record."""
    from unconfuse.recipes import recipe_module
    from unconfuse.train.config import load_config

    module = recipe_module(recipe)
    try:
        return module.main(load_config(module.CONFIG_CLASS, config, list(overrides or [])))
    except AlreadyFinished as done:
        print(f"{done.run_dir}: finished before ({done.results.steps} steps, {done.results.attempts} attempt(s)); "
              f"nothing to do (--force starts afresh)", file=sys.stderr, flush=True)
        return done.results


def recipe_cli(recipe: str, argv: list[str] | None = None) -> int:
    """The command line every recipe module has: ``--config YAML``, ``key=value`` overrides and
    ``--help`` listing every config field. Bad config or data: exit 2 with a one-line message."""
    import argparse

    from unconfuse.recipes import recipe_module
    from unconfuse.train.config import describe

    module = recipe_module(recipe)
    parser = argparse.ArgumentParser(prog=f"unconfuse train {recipe}", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=(module.__doc__ or "").split("\n\n")[0],
                                     epilog="config fields (YAML keys, or key=value overrides):\n" + describe(module.CONFIG_CLASS)
                                     + "\n\nunconfuse train also takes --launch ACCELERATE_YAML: the same run under accelerate launch")
    parser.add_argument("--config", help=f"recipe YAML (configs/{recipe}/*.yaml)")
    parser.add_argument("--output-dir", help="the run directory (the same as the override output_dir=DIR)")
    parser.add_argument("--force", action="store_true", help="start afresh in an output dir holding another run "
                        "(the same as force=true; its contents are moved aside, not deleted)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *([f"output_dir={args.output_dir}"] if args.output_dir else []),
                 *(["force=true"] if args.force else [])]
    from unconfuse.eval.stopping import Stopped, graceful_stop, report_stopped

    with graceful_stop():  # what `accelerate launch` runs in every process: each saves and stops on SIGTERM
        try:
            print(summary(run_recipe(recipe, args.config, overrides)))
        except Stopped as exc:
            return report_stopped(exc)
        except Exception as exc:
            status = exit_status(exc)
            if status is None:
                raise
            return _failed(exc, status)
    return 0


def exit_status(exc: BaseException) -> int | None:
    """The exit status of a run that raised ``exc``: 2 for bad input (config, data, model, run folder or record), 3 for a
    run that diverged, None for anything else (a bug: let its traceback show)."""
    from unconfuse.eval.benchmarks import BenchmarkError
    from unconfuse.eval.io import RunDirError
    from unconfuse.eval.models import ModelLoadError
    from unconfuse.eval.runs import RunFormatError
    from unconfuse.train.callbacks import NonFiniteError
    from unconfuse.train.config import ConfigError

    if isinstance(exc, (ConfigError, LeakageError, BenchmarkError, ModelLoadError, RunDirError, RunFormatError)):
        return 2
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # a full disk: its message names the file
        return 2
    return 3 if isinstance(exc, NonFiniteError) else None


def _failed(exc: Exception, status: int) -> int:
    """One error line, and the exit status also written where ``unconfuse train --launch`` reads it
    (accelerate launch reports every failing process as exit 1)."""
    from unconfuse.eval.launch import record_exit_status

    print(f"error: {exc}", file=sys.stderr)
    record_exit_status(status)
    return status
