"""``unconfuse study``: a mitigation study (strategies x seeds x folds) as independent jobs.

A study file names the benchmark, the folds, the seeds and the strategies (each a recipe, its config
and overrides). ``study plan`` expands it to one ``unconfuse cv ... --fold K`` command per job, one
per line, so that any scheduler runs them (a Slurm array over the lines: configs/slurm/array.sbatch;
a shell loop; GNU parallel); every job is resumable (rerun the same line). ``study collect`` pools
each cv (``cv --collect``) and compares all of them in one ``unconfuse compare``, against the pooled
base model of the baseline strategy. No scheduler of our own: the jobs are plain commands.

Relative paths in a study file are relative to the directory the command runs in (as ``--config``
is everywhere); the plan prints absolute paths, so its lines run from anywhere.

    benchmark: world:test        # any benchmark argument
    folds: 2
    split_seed: 0                # one fold assignment for every strategy and seed
    seeds: [0, 1]                # training seeds (train.seed)
    out: runs/study-world        # <out>/<strategy>/seed-<s>/ is each cv; <out>/compare/ the comparison
    launch: null                 # optional accelerate config each fold trains under
    overrides: [report_to=none]  # for every job
    baseline: hardneg            # whose pooled base model the comparison is against (default: the first)
    strategies:
      - {name: hardneg, recipe: clip_hardneg, config: configs/clip_hardneg/tiny.yaml}
      - {name: clip-ft, recipe: clip_hardneg, config: configs/clip_hardneg/tiny.yaml, overrides: [loss.hardneg_weight=0]}

A training-free strategy (``unconfuse eval --strategy``) is listed beside the recipes with ``eval`` instead of
``recipe``: it needs no folds, so it is one ``unconfuse eval`` job over the whole benchmark (the pairs every
cv's pooled test covers, each once), one per seed where the strategy draws noise (vcd), else one::

      - {name: vcd, eval: vcd, model: tiny-llava-base, mode: greedy, options: [alpha=1], retention: world:val}

Its folder is ``<out>/<name>/seed-<s>/`` (``<out>/<name>/`` for a strategy without a seed); ``collect``
compares it with the rest.

A strategy may start from another's selected adapters (``init_from: <an earlier strategy's name>``, the MLLM
recipes): each of its folds and seeds starts from the same fold and seed of that strategy (``init_adapters`` set
to that strategy's cv folder; the cv hands each fold its own), so the plan lists its jobs after that strategy's.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unconfuse.recipes import RECIPES, recipe_module
from unconfuse.train.config import ConfigError, load_config
from unconfuse.train.run_data import check_toy_data

STUDY_KEYS = {"benchmark", "folds", "split_seed", "seeds", "out", "launch", "overrides", "baseline", "strategies"}
STRATEGY_KEYS = {"name", "recipe", "config", "overrides", "init_from"}
EVAL_STRATEGY_KEYS = {"name", "eval", "model", "mode", "options", "retention"}
# set by the study for every job: a strategy's own override of these would silently lose
STUDY_SET = ("strategy", "train.seed", "output_dir", "resume_from_checkpoint", "init_adapters")


class StudyError(ValueError):
    """A bad study file; the message names the file and the key."""


@dataclass
class Strategy:
    name: str
    recipe: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None  # the strategy whose selected adapters each fold and seed starts from


@dataclass
class EvalStrategy:
    """A training-free strategy of a study: ``unconfuse eval --strategy`` over the whole benchmark."""

    name: str
    strategy: str  # plain, vcd, describe, retrieve
    model: str
    mode: str
    options: list[str] = field(default_factory=list)
    retention: str | None = None

    @property
    def seeded(self) -> bool:
        from unconfuse.eval.strategies import STRATEGIES

        return "seed" in STRATEGIES[self.strategy]


@dataclass
class Study:
    path: Path
    benchmark: str
    folds: int
    split_seed: int
    seeds: list[int]
    out: Path
    launch: Path | None
    overrides: list[str]
    baseline: str
    strategies: list[Strategy]
    evals: list[EvalStrategy] = field(default_factory=list)

    def cv_dir(self, strategy: Strategy, seed: int) -> Path:
        return self.out / strategy.name / f"seed-{seed}"

    def eval_dirs(self, strategy: EvalStrategy) -> list[tuple[int | None, Path]]:
        """(seed, folder) of each job of a training-free strategy: one per study seed where it draws noise."""
        if strategy.seeded:
            return [(seed, self.out / strategy.name / f"seed-{seed}") for seed in self.seeds]
        return [(None, self.out / strategy.name)]

    @property
    def compare_dir(self) -> Path:
        return self.out / "compare"

    def job_overrides(self, strategy: Strategy, seed: int) -> list[str]:
        """Every fold job's overrides of one (strategy, seed): the study's, the strategy's, then what
        the study sets (the strategy name groups seeds in compare; latest resumes a requeued job)."""
        init = next((s for s in self.strategies if s.name == strategy.init_from), None)
        return [*self.overrides, *strategy.overrides, f"strategy={strategy.name}", f"train.seed={seed}",
                "resume_from_checkpoint=latest", *([f"init_adapters={self.cv_dir(init, seed)}"] if init else [])]


def _path(value: Any, where: str, must_exist: bool = True) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise StudyError(f"{where}: a path is needed")
    path = Path(value).expanduser()
    if must_exist and not path.exists():
        raise StudyError(f"{where}: {value} not found (relative paths are from the current directory)")
    return path.resolve()


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or any(not isinstance(v, str) or "=" not in v for v in value):
        raise StudyError(f"{where}: a list of key=value overrides is needed")
    for item in value:
        if item.split("=", 1)[0] in STUDY_SET:
            raise StudyError(f"{where}: {item!r}: the study sets {item.split('=', 1)[0]} itself "
                             f"({', '.join(STUDY_SET)}); use seeds: and the strategy's name")
    return list(value)


def load_study(path: str | Path) -> Study:
    """Read and check a study file: every key known, every recipe and config present, names unique."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StudyError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: a mapping of study keys is needed ({', '.join(sorted(STUDY_KEYS))})")
    unknown = sorted(set(data) - STUDY_KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key {unknown[0]!r}; study keys: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("benchmark", "folds", "out", "strategies"):
        if data.get(key) in (None, "", []):
            raise StudyError(f"{path}: {key!r} is required")
    folds = data["folds"]
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise StudyError(f"{path}: folds: an integer of at least 2 is needed, got {folds!r}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds: a list of distinct integers is needed, got {seeds!r}")
    split_seed = data.get("split_seed", 0)
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise StudyError(f"{path}: split_seed: an integer is needed, got {split_seed!r}")
    if not isinstance(data["strategies"], list):
        raise StudyError(f"{path}: strategies: a list of {{name, recipe, config, overrides}} is needed")
    strategies, evals = [], []
    for i, item in enumerate(data["strategies"]):
        where = f"{path}: strategies[{i}]"
        if not isinstance(item, dict):
            raise StudyError(f"{where}: a mapping of {', '.join(sorted(STRATEGY_KEYS))} is needed")
        if "eval" in item:
            evals.append(_eval_strategy(item, where))
            continue
        unknown = sorted(set(item) - STRATEGY_KEYS)
        if unknown:
            raise StudyError(f"{where}: unknown key {unknown[0]!r}; strategy keys: {', '.join(sorted(STRATEGY_KEYS))}")
        name = item.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            raise StudyError(f"{where}: name: letters, digits and . _ + - are needed (it names a folder), got {name!r}")
        if item.get("recipe") not in RECIPES:
            raise StudyError(f"{where}: recipe {item.get('recipe')!r} is not one of {', '.join(RECIPES)}")
        init_from = item.get("init_from")
        if init_from is not None and init_from not in [s.name for s in strategies]:
            raise StudyError(f"{where}: init_from {init_from!r} is not the name of a strategy listed before it (its "
                             "jobs must come first in the plan)")
        strategies.append(Strategy(name, item["recipe"], _path(item.get("config"), f"{where}: config"),
                                   _overrides(item.get("overrides"), f"{where}: overrides"), init_from))
    names = [s.name for s in strategies]
    every = names + [e.name for e in evals]
    duplicate = next((n for n in every if every.count(n) > 1), None)
    if duplicate:
        raise StudyError(f"{path}: strategies: the name {duplicate!r} is used twice")
    if not names:
        raise StudyError(f"{path}: strategies: at least one recipe strategy is needed (its pooled base model is the "
                         "baseline of the comparison)")
    baseline = data.get("baseline", names[0])
    if baseline not in names:
        raise StudyError(f"{path}: baseline {baseline!r} is not a recipe strategy's name ({', '.join(names)})")
    overrides = _overrides(data.get("overrides"), f"{path}: overrides")
    benchmark = str(data["benchmark"])
    recipe_items = [i for i, item in enumerate(data["strategies"]) if "eval" not in item]  # positions in the file
    for i, strategy in zip(recipe_items, strategies):  # a bad key or value fails here, not in job 37 of 45
        try:
            cfg = load_config(recipe_module(strategy.recipe).CONFIG_CLASS, strategy.config, [*overrides, *strategy.overrides])
            check_toy_data(cfg, benchmark)
        except ConfigError as exc:
            raise StudyError(f"{path}: strategies[{i}] ({strategy.name}): {exc}") from None
    if Path(benchmark).expanduser().exists():  # a folder or file: absolute, so the jobs run from anywhere
        benchmark = str(Path(benchmark).expanduser().resolve())
    return Study(path, benchmark, folds, split_seed, seeds, _path(data["out"], f"{path}: out", must_exist=False),
                 _path(data["launch"], f"{path}: launch") if data.get("launch") else None,
                 overrides, baseline, strategies, evals)


def _eval_strategy(item: dict[str, Any], where: str) -> EvalStrategy:
    """A training-free strategy entry, checked as ``unconfuse eval`` checks its options."""
    from unconfuse.eval.prompts import MODES
    from unconfuse.eval.strategies import StrategyError, parse_strategy

    unknown = sorted(set(item) - EVAL_STRATEGY_KEYS)
    if unknown:
        raise StudyError(f"{where}: unknown key {unknown[0]!r}; training-free strategy keys: "
                         f"{', '.join(sorted(EVAL_STRATEGY_KEYS))}")
    name = item.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise StudyError(f"{where}: name: letters, digits and . _ + - are needed (it names a folder), got {name!r}")
    for key in ("model", "mode"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise StudyError(f"{where}: {key!r} is required for a training-free strategy")
    if item["mode"] not in MODES or item["mode"] == "clip":
        raise StudyError(f"{where}: mode {item['mode']!r}: one of mc, greedy, prefix, freeform")
    options = item.get("options") or []
    if not isinstance(options, list) or any(not isinstance(o, str) for o in options):
        raise StudyError(f"{where}: options: a list of key=value texts is needed")
    if any(o.partition("=")[0] == "seed" for o in options):
        raise StudyError(f"{where}: options: the study sets seed itself (seeds:)")
    try:
        parse_strategy(str(item["eval"]), options)
    except StrategyError as exc:
        raise StudyError(f"{where}: {exc}") from None
    retention = item.get("retention")
    if retention is not None and not isinstance(retention, str):
        raise StudyError(f"{where}: retention: a retention set argument is needed, got {retention!r}")
    return EvalStrategy(name, str(item["eval"]), item["model"], item["mode"], list(options), retention)


def eval_arguments(study: Study, strategy: EvalStrategy, seed: int | None, out: Path) -> list[str]:
    """``unconfuse eval`` arguments of one job of a training-free strategy."""
    options = [*strategy.options, *([f"seed={seed}"] if seed is not None else [])]
    return ["eval", "--model", strategy.model, "--mode", strategy.mode, "--benchmark", study.benchmark,
            "--out", str(out), "--strategy", strategy.strategy, *(["--strategy-option", *options] if options else []),
            *(["--retention", strategy.retention] if strategy.retention else []), "--quiet"]


def cv_arguments(study: Study, strategy: Strategy, seed: int) -> list[str]:
    """``unconfuse cv`` arguments of one (strategy, seed), the same for its fold jobs and its collect."""
    return ["cv", strategy.recipe, "--config", str(strategy.config), "--folds", str(study.folds),
            "--benchmark", study.benchmark, "--seed", str(study.split_seed), "--out", str(study.cv_dir(strategy, seed))]


def plan_lines(study: Study) -> list[str]:
    """One shell command per job: every strategy x seed x fold, as ``unconfuse cv ... --fold K``."""
    lines = []
    for strategy in study.strategies:
        for seed in study.seeds:
            for fold in range(study.folds):
                argv = ["unconfuse", *cv_arguments(study, strategy, seed), "--fold", str(fold),
                        *(["--launch", str(study.launch)] if study.launch else []), *study.job_overrides(strategy, seed)]
                lines.append(shlex.join(argv))
    for strategy in study.evals:
        for seed, out in study.eval_dirs(strategy):
            lines.append(shlex.join(["unconfuse", *eval_arguments(study, strategy, seed, out)]))
    return lines


def collect_study(study: Study) -> dict[str, Any]:
    """Pool every cv of the study and compare them all (seeds grouped per strategy) against the
    baseline strategy's pooled base model; refuses, listing them, while any job has not finished."""
    from unconfuse.eval.io import atomic_write_json
    from unconfuse.eval.tools.compare import run_compare

    from .cv import MissingFolds, collect_cv

    cells = [(s, seed) for s in study.strategies for seed in study.seeds]
    missing = [f"{study.cv_dir(s, seed).relative_to(study.out)}/fold-{k}" for s, seed in cells for k in range(study.folds)
               if not (study.cv_dir(s, seed) / f"fold-{k}" / "results.json").exists()]
    eval_dirs = [out for e in study.evals for _, out in study.eval_dirs(e)]
    missing += [str(out.relative_to(study.out)) for out in eval_dirs if not (out / "results.json").exists()]
    if missing:
        raise MissingFolds(f"{study.out}: {len(missing)} of {len(cells) * study.folds + len(eval_dirs)} jobs have not "
                           f"finished: "
                           f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
                           f"(`unconfuse study plan {study.path}` lists their commands)")
    for strategy, seed in cells:
        print(f"collecting {strategy.name} seed {seed}", flush=True)
        collect_cv(strategy.recipe, str(strategy.config), study.folds, study.benchmark, study.cv_dir(strategy, seed),
                   study.split_seed, study.job_overrides(strategy, seed))
    baseline = next(s for s in study.strategies if s.name == study.baseline)
    summary = run_compare([*(study.cv_dir(s, seed) for s, seed in cells), *eval_dirs],
                          study.cv_dir(baseline, study.seeds[0]) / "base",
                          study.compare_dir, title=f"study {study.path.name}: {len(study.strategies)} strategies x "
                                                   f"{len(study.seeds)} seeds x {study.folds} folds")
    # the study's record: every cv and the comparison's rows and seed groups, for scripts
    atomic_write_json(study.out / "study.json", {
        "study": str(study.path.resolve()), "benchmark": study.benchmark, "folds": study.folds, "seeds": study.seeds,
        "cvs": {f"{s.name}/seed-{seed}": str(study.cv_dir(s, seed)) for s, seed in cells},
        "evals": {str(out.relative_to(study.out)): str(out) for out in eval_dirs},
        "comparison": str(study.compare_dir / "comparison.md"),
        "rows": summary["rows"], "groups": summary["groups"]})
    return summary
