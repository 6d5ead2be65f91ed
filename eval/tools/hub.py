"""``unconfuse card`` and ``unconfuse push``: a finished run shared with its evidence. The model card names the base
model and its revision, the recipe and its resolved config, the training data's fingerprint, the test pairs' set
accuracy and confusion before and after (bootstrap 95% CIs, McNemar's exact p on per-pair set correctness), the
retention change, and carries ``model-index`` metadata so the Hub shows the results. ``push`` uploads the run's
selected weights (LoRA adapters, or merged into their base with ``merged``) with the card through
``huggingface_hub``; the token comes from the environment (``HF_TOKEN``) only and is written nowhere."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from unconfuse.eval.runs import RESULTS_FILE, RunFormatError, read_run_results
from unconfuse.eval.scorer import compare
from unconfuse.eval.tools.compare import CompareError, load_scored_runs

METRICS = (("set_accuracy", "Set accuracy"), ("confusion", "Confusion"), ("individual_accuracy", "Individual accuracy"))
EVIDENCE = ("config.yaml", "results.json", "leakage.json", "fingerprint.json")  # copied under unconfuse/ beside the weights


class HubError(ValueError):
    """A run that cannot be shared (unfinished, never tested, not a run), or a push that cannot start."""


def _finished_run(run_dir: Path):
    if not (run_dir / RESULTS_FILE).exists():
        raise HubError(f"{run_dir}: no {RESULTS_FILE}: the run has not finished (rerun its command to complete it)")
    try:
        results = read_run_results(run_dir)
    except RunFormatError as exc:
        raise HubError(str(exc)) from None
    if results.kind != "run":
        raise HubError(f"{run_dir}: a {results.kind} folder holds several runs; share one of them")
    if not (run_dir / "test" / "predictions.jsonl").exists() or not (run_dir / "base" / "predictions.jsonl").exists():
        raise HubError(f"{run_dir}: its test pairs were never scored before and after training (base/, test/)")
    if not (run_dir / "checkpoints" / "best").is_dir():
        raise HubError(f"{run_dir}: no checkpoints/best (the selected weights)")
    return results


def _fingerprint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "fingerprint.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HubError(f"{path}: unreadable ({exc})") from None


def _wandb_link(run_dir: Path, results) -> str | None:
    if results.details.get("wandb_url"):
        return results.details["wandb_url"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    return f"offline run `{offline[-1].relative_to(run_dir)}` (upload it with `wandb sync`)" if offline else None


def _ci(result: dict[str, Any], key: str) -> str:
    value, bounds = result.get(key), (result.get("ci") or {}).get(key)
    if value is None:
        return "n/a"
    return f"{value:.1f} [{bounds[0]:.1f}, {bounds[1]:.1f}]" if bounds else f"{value:.1f}"


def card_data(run_dir: str | Path) -> dict[str, Any]:
    """What the card says, as data: the run record, its fingerprint, and the paired comparison of its test answers
    with its base's (rescored from ``base/`` and ``test/``, as ``unconfuse compare`` does)."""
    run_dir = Path(run_dir)
    results = _finished_run(run_dir)
    try:
        bench, base, (tested,) = load_scored_runs([run_dir], run_dir / "base", results.test_data)
    except CompareError as exc:
        raise HubError(str(exc)) from None
    paired = compare(bench.pairs, base.answers, tested.answers)
    fingerprint = _fingerprint(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    return {"results": results, "model": fingerprint.get("model") or {}, "config": config, "paired": paired,
            "benchmark": bench, "data_fingerprints": fingerprint.get("data", {}), "wandb": _wandb_link(run_dir, results),
            "weights": "adapters" if (run_dir / "checkpoints" / "best" / "adapter_config.json").exists() else "model",
            "open_clip": (run_dir / "checkpoints" / "best" / "open_clip_config.json").exists()}


def _hub_id(model: dict[str, Any]) -> str | None:
    """The base model's hub id, when it came from the hub (not a local folder or a built tiny preset)."""
    model_id = model.get("model_id") or ""
    if model_id.startswith("hf-hub:"):
        model_id = model_id.removeprefix("hf-hub:")
    return model_id if model_id.count("/") == 1 and not Path(model_id).exists() and not model.get("files") else None


def model_card(run_dir: str | Path, merged: bool = False) -> str:
    """The model card (README.md) of a finished run: YAML metadata with ``model-index``, then the evidence."""
    data = card_data(run_dir)
    results, paired, model = data["results"], data["paired"], data["model"]
    base_id = _hub_id(model)
    dataset = {"name": results.test_data, "type": "mediconfusion" if "mediconfusion" in results.test_data.lower()
               else results.test_data}
    metrics = [{"type": key, "name": f"{name} (test pairs, {results.mode})", "value": round(results.final[key], 2)}
               for key, name in METRICS if results.final.get(key) is not None]
    meta: dict[str, Any] = {
        "library_name": ("peft" if data["weights"] == "adapters" and not merged
                         else "open_clip" if data["open_clip"] else "transformers"),
        "tags": ["unconfuse", "mediconfusion", results.recipe, results.strategy],
        "model-index": [{"name": f"{results.model} {results.strategy}", "results": [
            {"task": {"type": "visual-question-answering", "name": "confusing-pair VQA"}, "dataset": dataset,
             "metrics": metrics}]}]}
    if base_id:
        meta["base_model"] = base_id
    retention = results.retention
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {results.model}: {results.strategy} ({results.recipe})", "",
             f"Fine-tuned with unconfuse's recipe `{results.recipe}` on confusing pairs "
             f"`{results.train_data}`, selected on validation pairs only, tested on `{results.test_data}` "
             f"({paired['n_pairs']} pairs, {results.mode} mode), seed {results.seed}, {results.steps} steps "
             f"(selected step {results.best_step}).", "",
             "## Evidence", "",
             "| test pairs | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {_ci(results.base, key)} | {_ci(results.final, key)} |" for key, name in METRICS]
    diff_ci = paired["set_accuracy_diff_ci"]
    lines += ["", f"Set accuracy change {paired['set_accuracy_diff']:+.1f} points (paired bootstrap 95% CI "
                  f"[{diff_ci[0]:+.1f}, {diff_ci[1]:+.1f}]); McNemar's exact p = {paired['mcnemar_p']:.3g} "
                  f"({paired['mcnemar_only_b']} pairs fixed, {paired['mcnemar_only_a']} broken). Intervals are "
                  "percentile bootstraps over pairs."]
    if retention:
        head = retention["metrics"][retention["headline"]]
        lines += ["", f"Retention ({retention['headline']} on `{retention['benchmark']}`, {head['n']} held-out items, "
                      f"{retention['mode']}): {head['before']:.1f} -> {head['after']:.1f}, change {head['diff']:+.1f} "
                      f"[{head['diff_ci'][0]:+.1f}, {head['diff_ci'][1]:+.1f}], McNemar p = {head['mcnemar_p']:.3g}."]
    else:
        lines += ["", "Retention: not measured (what the mitigation cost the model's general ability is unknown)."]
    origin = (f"`{base_id}`" + (f" (revision `{model['revision']}`)" if model.get("revision") else "")) if base_id \
        else f"`{model.get('name') or results.model}` (a local model, not on the Hub)"
    lines += ["", "## Provenance", "",
              f"- Base model: {origin}",
              f"- Weights here: {'the selected LoRA adapters merged into the base' if merged else 'the selected ' + data['weights']}",
              f"- Scorer {results.scorer_version}, prompts {results.prompt_version}",
              *[f"- Data fingerprint, {split}: `{value}`" for split, value in data["data_fingerprints"].items()
                if isinstance(value, str)],
              f"- W&B: {data['wandb'] or 'not logged'}",
              "", "## Config", "", "```yaml", yaml.safe_dump(data["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(run_dir: str | Path, out: str | Path | None = None, merged: bool = False) -> Path:
    """Write the card of ``run_dir`` to ``out`` (default ``RUN/README.md``), atomically; its path."""
    from unconfuse.eval.io import atomic_write_text

    path = Path(out) if out else Path(run_dir) / "README.md"
    atomic_write_text(path, model_card(run_dir, merged))
    return path


def push(run_dir: str | Path, repo_id: str, merged: bool = False, private: bool = False,
         revision: str | None = None) -> str:
    """Upload a finished run's selected weights, its card and its evidence (``unconfuse/``: config, results,
    leakage audit, fingerprint) to the Hub repo ``repo_id`` (created when missing; ``revision``: a branch, created
    when missing). The endpoint is ``$HF_ENDPOINT`` (default the Hub), the token ``$HF_TOKEN``. Returns the commit URL."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise HubError("HF_TOKEN is not set: push reads the token from the environment only")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubError("HF_HUB_OFFLINE is set: push needs the network (unset it, or write the card with `unconfuse card`)")
    best = run_dir / "checkpoints" / "best"
    card = model_card(run_dir, merged)  # refuses unfinished runs before anything is uploaded
    if merged and not (best / "adapter_config.json").exists():
        raise HubError(f"--merged: {best} holds whole weights already (no LoRA adapters to merge)")
    with tempfile.TemporaryDirectory(prefix="unconfuse-push-") as tmp:
        staging = Path(tmp)
        if merged:
            from unconfuse.eval.models.hf_vlm import merge_adapters

            model, processor = merge_adapters(best)
            model.save_pretrained(str(staging), safe_serialization=True)
            processor.save_pretrained(str(staging))
        else:
            for path in best.iterdir():
                if path.is_file():
                    shutil.copy2(path, staging / path.name)
        (staging / "config.yaml").unlink(missing_ok=True)  # the run's config goes under unconfuse/ with the evidence
        (staging / "step.txt").unlink(missing_ok=True)
        (staging / "unconfuse").mkdir()
        for name in EVIDENCE:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, staging / "unconfuse" / name)
        (staging / "README.md").write_text(card)
        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(staging), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=f"unconfuse push: {run_dir.name}")
    return str(info.commit_url)
