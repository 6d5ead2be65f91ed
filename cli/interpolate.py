"""``unconfuse interpolate RUN``: weight-space interpolation between a run's base and its selected weights
(WiSE-FT), each alpha scored on the validation side only, the test side scored once for the chosen alpha.

``alpha`` 0 is the base model and 1 the run's selected weights. Full weights (an encoder run) are interpolated
as ``(1 - alpha) * base + alpha * tuned``; a LoRA run's adapters as ``alpha * B`` (the adapter's update scaled,
which is the same interpolation of the merged weights), and the modules it trained in full (peft's
``modules_to_save``: a projector, a vision tower) as weights. Every alpha is scored on the run's **val** pairs
and its **val-side** retention set (``data.val_retention``); the alpha is chosen by the run's selection rule (or
``--selection`` / ``--retention-floor``); only then are the test pairs and the test retention set scored, once,
for the chosen alpha. The output is a normal run folder (``compare``, ``atlas`` and ``study collect`` read it):
the run's base scores, the chosen alpha's test scores and retention, the interpolated weights in
``checkpoints/best``, ``val_history.jsonl`` (a row per alpha), ``pareto.json`` and ``pareto.png``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from unconfuse.eval.evaluation import predict, score_records
from unconfuse.eval.folders import owned_folder
from unconfuse.eval.io import atomic_folder, atomic_write_json, atomic_write_text
from unconfuse.eval.retention import RetentionSet, read_records, retention_block, summarize
from unconfuse.eval.runs import RunFormatError, read_run_results, scored_folder, write_run_results, write_scored
from unconfuse.recipes import recipe_module
from unconfuse.train.callbacks import ValidationState, better, latest
from unconfuse.train.config import ConfigError, dump_config, load_config
from unconfuse.train.run_data import retention_set_for

VAL_KEYS = ("set_accuracy", "confusion", "individual_accuracy", "invalid")


def parse_alphas(text: str) -> list[float]:
    """``0,0.25,0.5`` -> sorted distinct alphas in [0, 1], 0 (the base: the retention floor's reference) always in."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"--alphas {text!r}: a comma-separated list of numbers between 0 and 1") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"--alphas {text!r}: every alpha must be between 0 and 1")
    return sorted({0.0, *alphas})


class EncoderWeights:
    """An encoder run: the base and the selected full weights, blended into one loaded model."""

    def __init__(self, cfg: Any, best: Path, device: str):
        from unconfuse.eval.models import load_model, resolve_model
        from unconfuse.recipes.clip_hardneg import hf_clip_encoder, open_clip_encoder

        spec = resolve_model(cfg.model)
        spec = replace(spec, clip_prompt="question" if cfg.data.text == "question_option" else "default")
        self.backend, self.spec = load_model(spec, device=device)
        make = open_clip_encoder if spec.family == "open-clip" else hf_clip_encoder
        self.encoder = make(self.backend, self.spec)
        tuned, _ = load_model(replace(spec, build=None, model_id=self.encoder.model_id(best)), device=device)
        self.base = {k: v.detach().clone() for k, v in self.backend.model.state_dict().items()}
        self.tuned = {k: v.detach() for k, v in tuned.model.state_dict().items()}
        if set(self.base) != set(self.tuned):
            raise ConfigError(f"{best}: its weights are not the run's base model's ({cfg.model}) tensors")

    def set(self, alpha: float) -> None:
        state = {k: (1 - alpha) * b + alpha * self.tuned[k] if b.is_floating_point() else self.tuned[k]
                 for k, b in self.base.items()}
        self.backend.model.load_state_dict(state)
        self.backend.clear_cache()

    def save(self, folder: Path) -> None:
        self.encoder.save(folder)


class AdapterWeights:
    """A LoRA run of an MLLM: the base with the run's adapters, their update scaled by alpha."""

    def __init__(self, cfg: Any, best: Path, device: str):
        from peft import PeftModel
        from peft.utils import ModulesToSaveWrapper

        from unconfuse.eval.models import load_model, resolve_model

        spec = resolve_model(cfg.model)
        if cfg.train.bf16:
            spec = replace(spec, dtype="bfloat16")
        self.backend, self.spec = load_model(spec, device=device)
        self.model = PeftModel.from_pretrained(self.backend.model, str(best))
        self.backend.model = self.model.get_base_model()  # the scorer sees the adapted layers
        self.backend.model.eval()
        params = dict(self.model.named_parameters())
        self.lora_b = {name: p.detach().clone() for name, p in params.items() if ".lora_B." in name}
        self.full: dict[str, tuple[Any, Any]] = {}  # trained-in-full parameter -> (base value, trained value)
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                base = dict(module.original_module.named_parameters())
                for key, p in module.modules_to_save[module.active_adapter].named_parameters():
                    self.full[f"{name}.modules_to_save.{module.active_adapter}.{key}"] = (base[key].detach().clone(),
                                                                                          p.detach().clone())
        self.params = params

    def set(self, alpha: float) -> None:
        import torch

        with torch.no_grad():
            for name, value in self.lora_b.items():
                self.params[name].copy_(alpha * value)
            for name, (base, tuned) in self.full.items():
                self.params[name].copy_((1 - alpha) * base + alpha * tuned)
        self.backend.clear_cache()

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))
        self.backend.processor.save_pretrained(str(folder))


def sweep(weights, alphas: list[float], score_val: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """One validation row per alpha: the val pairs' metrics and the val-side retention (``score_val``)."""
    rows = []
    for alpha in alphas:
        weights.set(alpha)
        row = {"alpha": alpha, **score_val()}
        rows.append(row)
        print(f"alpha {alpha:.2f}: val set accuracy {row['set_accuracy']:.1f}, confusion "
              f"{'n/a' if row['confusion'] is None else format(row['confusion'], '.1f')}, val retention {row['retention']:.1f}",
              flush=True)
    return rows


def score_test_side(weights, alpha: float, retention: RetentionSet | None, modes: list[str], score, retain):
    """The test side at ``alpha``, in the order a run scores it (``score_stage``): the retention questions first,
    then the pairs in each mode, so that cached image features come from the same batches and the predictions
    equal the run's own bit for bit at alpha 0 (its base) and 1 (its selected weights)."""
    weights.set(alpha)
    retention_records = retain(retention) if retention is not None else None
    return retention_records, {mode: score(mode) for mode in modes}


def choose(rows: list[dict[str, Any]], selection: str, floor: float) -> dict[str, Any]:
    """The validation loop's own rule (``ValidationState``) over the alphas, ascending from the base (alpha 0):
    highest val set accuracy (ties: lower confusion, then the smaller alpha), among the alphas whose val retention
    is within ``floor`` points of the base's when ``selection`` has a retention floor; ``last``: alpha 1, the run."""
    return ValidationState(rows, floor if selection == "set_accuracy_with_retention_floor" else None,
                           latest if selection == "last" else better).best


def interpolate(run_dir: str | Path, alphas: list[float], out: str | Path | None = None, selection: str | None = None,
                retention_floor: float | None = None, force: bool = False) -> Path:
    """Interpolate run ``run_dir`` (see the module docstring); returns the output run folder."""
    import torch

    start = time.time()
    run_dir = Path(run_dir)
    source = read_run_results(run_dir)
    if source.kind != "run":
        raise RunFormatError(f"{run_dir}: interpolate takes a training run's folder, not a {source.kind} (interpolate "
                             "each fold's run)")
    best = run_dir / "checkpoints" / "best"
    if not best.is_dir():
        raise RunFormatError(f"{run_dir}: no checkpoints/best (the run's selected weights)")
    module = recipe_module(source.recipe)
    cfg = load_config(module.CONFIG_CLASS, run_dir / "config.yaml")
    selection = selection or cfg.train.selection
    floor = cfg.train.retention_floor if retention_floor is None else retention_floor
    from unconfuse.eval.benchmarks import load_benchmark

    val, test = load_benchmark(cfg.data.val), load_benchmark(cfg.data.test)
    val_retention = retention_set_for(cfg.data.val_retention, cfg.data.val, val)
    if val_retention is None:
        raise ConfigError(f"{run_dir}: its data.val_retention={cfg.data.val_retention!r} gives no validation-side retention "
                          "set for its val pairs; interpolation chooses on val pairs and val retention only")
    test_retention = retention_set_for(cfg.data.retention, cfg.data.test, test)
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-wise"
    fingerprint = {"command": "interpolate", "source": json.loads((run_dir / "fingerprint.json").read_text()),
                   "source_results": source.final, "alphas": alphas, "selection": selection, "retention_floor": floor}

    from unconfuse.eval.prompts import load_prompts
    from unconfuse.train.distributed import process_device

    prompts = load_prompts(source.prompt_version) if source.prompt_version else load_prompts()
    encoder = source.recipe == "clip_hardneg"
    with owned_folder(out, fingerprint, force=force, what="interpolation"):
        torch.manual_seed(cfg.train.seed)
        weights = (EncoderWeights if encoder else AdapterWeights)(cfg, best, process_device())
        backend, spec = weights.backend, weights.spec
        val_mode = "clip" if encoder else cfg.val_mode
        retention_mode = getattr(cfg.data, "retention_mode", "clip")  # as the run scored it (lifecycle.retention_mode)
        batch = cfg.val_batch_pairs

        def retain(rset: RetentionSet) -> list[dict[str, Any]]:
            from unconfuse.eval.retention import answer_retention

            return answer_retention(backend, spec, rset, retention_mode, prompts, batch=2 * batch)

        def score(bench, mode):
            records = predict(backend, spec, mode, bench, prompts, batch)
            return records, score_records(bench, records, prompt_version=prompts.version)

        def score_val() -> dict[str, Any]:
            scores = score(val, val_mode)[1]
            summary = summarize(retain(val_retention))
            metric = "accuracy" if "accuracy" in summary else "retrieval_r1"
            return {**{k: scores[k] for k in VAL_KEYS}, "set_accuracy_ci": scores["ci"]["set_accuracy"],
                    "retention": summary[metric]["value"], "retention_ci": summary[metric]["ci"], "retention_metric": metric}

        with torch.no_grad():
            rows = sweep(weights, alphas, score_val)
            chosen = choose(rows, selection, floor)
            print(f"chosen on the validation side ({selection}"
                  + (f", floor {floor:g} points" if selection == "set_accuracy_with_retention_floor" else "")
                  + f"): alpha {chosen['alpha']:.2f}; scoring the test side once", flush=True)
            # the test side, once, for the chosen alpha only
            modes = [source.mode, *source.other_modes]
            test_records, records = score_test_side(weights, chosen["alpha"], test_retention, modes, lambda m: score(test, m), retain)
            test_fingerprint = test.fingerprint()
            finals = {mode: write_scored(out / scored_folder("test", mode, source.mode), records[mode][1], records=records[mode][0],
                                         model=spec.name, mode=mode, benchmark=cfg.data.test,
                                         strategy=f"{source.strategy}+wise-ft", seed=source.seed,
                                         benchmark_fingerprint=test_fingerprint,
                                         title=f"{source.recipe} interpolated (alpha {chosen['alpha']:g}): {spec.name} / {mode}")
                      for mode in modes}
        with atomic_folder(out / "checkpoints" / "best") as tmp:
            weights.save(tmp)
            dump_config(cfg, tmp / "config.yaml")
            (tmp / "alpha.txt").write_text(f"{chosen['alpha']}\n")
        for name in ("config.yaml", "leakage.json"):
            shutil.copyfile(run_dir / name, out / name)
        for mode in modes:
            folder = scored_folder("base", mode, source.mode)
            shutil.copytree(run_dir / folder, out / folder, dirs_exist_ok=True)
        atomic_write_text(out / "val_history.jsonl", "".join(
            json.dumps({"step": source.best_step, **{k: v for k, v in row.items() if not k.endswith("_ci")}}) + "\n"
            for row in rows))
        retention = None
        if test_records is not None and (run_dir / "retention" / "base.jsonl").exists():
            before = read_records(run_dir / "retention" / "base.jsonl")
            (out / "retention").mkdir(exist_ok=True)
            shutil.copyfile(run_dir / "retention" / "base.jsonl", out / "retention" / "base.jsonl")
            atomic_write_text(out / "retention" / "test.jsonl", "".join(json.dumps(r) + "\n" for r in test_records))
            retention = retention_block(test_retention, retention_mode, before, test_records)
        pareto = {"source": str(run_dir.resolve()), "alphas": alphas, "selection": selection, "retention_floor": floor,
                  "retention_metric": rows[0]["retention_metric"], "chosen_alpha": chosen["alpha"], "rows": rows}
        atomic_write_json(out / "pareto.json", pareto)
        plot_pareto(out / "pareto.png", pareto, title=f"{source.strategy} ({run_dir.name}): validation side per alpha")
        results = replace(source, strategy=f"{source.strategy}+wise-ft", final=finals[source.mode],
                          best_val={k: chosen[k] for k in ("alpha", *VAL_KEYS, "retention")},
                          wall_time_s=source.wall_time_s + time.time() - start,
                          other_modes={m: {"base": source.other_modes[m]["base"], "final": finals[m]} for m in source.other_modes},
                          details={**source.details, "interpolation": {k: v for k, v in pareto.items() if k != "rows"}},
                          retention=retention)
        write_run_results(out, results)
    return out


def plot_pareto(path: Path, pareto: dict[str, Any], title: str) -> None:
    """Validation set accuracy against validation retention, one point per alpha (95% bootstrap intervals), the
    chosen alpha marked; up and to the right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pareto["rows"]
    fig, ax = plt.subplots(figsize=(7, 5))
    xs, ys = [r["retention"] for r in rows], [r["set_accuracy"] for r in rows]
    ax.plot(xs, ys, "-", color="gray", lw=1, alpha=0.6)
    for row in rows:
        x, y = row["retention"], row["set_accuracy"]
        chosen = row["alpha"] == pareto["chosen_alpha"]
        ax.errorbar(x, y, xerr=[[x - row["retention_ci"][0]], [row["retention_ci"][1] - x]],
                    yerr=[[y - row["set_accuracy_ci"][0]], [row["set_accuracy_ci"][1] - y]], fmt="*" if chosen else "o",
                    ms=14 if chosen else 5, capsize=3, alpha=0.8, color="C3" if chosen else "C0",
                    label=f"chosen: alpha {row['alpha']:g}" if chosen else None)
        ax.annotate(f"{row['alpha']:g}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    if pareto["selection"] == "set_accuracy_with_retention_floor":
        base = next(r for r in rows if r["alpha"] == 0)["retention"]
        ax.axvline(base - pareto["retention_floor"], color="C1", ls="--", lw=1,
                   label=f"retention floor (base - {pareto['retention_floor']:g})")
    ax.set_xlabel(f"validation retention: {pareto['retention_metric']} (%), higher is better")
    ax.set_ylabel("validation set accuracy (%), higher is better")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
