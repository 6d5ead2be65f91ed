"""Real size on one GPU: LLaVA-1.5-7B, Qwen2.5-VL-7B and MedGemma-4B at their published architectures (the presets'
``architecture`` blocks) with random weights, bf16, sdpa and activation checkpointing, through the recipes' own code.

Per model:
- 10 steps each of mllm_sft, mllm_dpo (+ image contrast) and mllm_grpo with the shipped real config of that family
  (LoRA as configured, the config's pairs per device), on random images of MediConfusion's size: the run's peak GPU
  memory (reserved, and allocated) against ``unconfuse plan``'s estimate for the same config, and training samples
  per second (the Trainer loop less validations and saves);
- beside each recipe, the plain TRL script (``bench/train_overhead.py``'s: TRL's trainer, the same model copy, LoRA
  and batches; GRPOTrainer on the recipe's prompt order): its samples per second, and the ratio (plain DPO for
  dpo + image contrast: losses differ there);
- eval greedy and mc on 352 questions (176 pairs) against a plain transformers loop (processor, chat template,
  forward / generate, 16 questions a batch): questions per second;
- the near-tie count (``eval/scorer.py: NOISE_BANDS``) and answers that flip between batch sizes 1 and 16.

A model's processor is its tiny twin's (tokenizer, chat template) with the real image settings (LLaVA 336 px and
patch 14: 576 image tokens; Qwen2.5-VL up to 504 x 504 px: 324; Gemma 3 896 px: 256), the special tokens' ids the
twin's. Each measurement prints as it ends and ``$OUT/gpu_scale.json`` (when OUT is set) is rewritten with it, so a run
stopped early keeps what it measured; ``--budget-s`` (540 on CUDA) skips, with the reason in its cell, what would end
past the device tool's 600-s limit. The training runs score a 4-pair test set; scoring speed is the eval row's.

    python bench/gpu_scale.py                        # CUDA (unrun so far); --models splits it over several calls
    python bench/gpu_scale.py --dry-run-on-cpu       # the same code path at reduced width (the suite runs it)
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench.*` from the repository
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# real preset -> (its tiny twin, the shipped real config family it trains with)
MODELS = {"llava-1.5-7b": ("tiny-llava", "llava_med"), "qwen2.5-vl-7b": ("tiny-qwen2.5-vl", "qwen2_5_vl"),
          "medgemma-4b": ("tiny-gemma3", "medgemma")}
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                   "special_tokens_map.json", "generation_config.json")
QWEN_MAX_PIXELS = 504 * 504  # a MediConfusion-sized image (~500 px a side): 324 image tokens after the 2x2 merge


def shrunk(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture at a CPU's width: every count and width small, image sizes and token counts kept."""
    config = copy.deepcopy(config)
    text, vision = config["text_config"], config["vision_config"]
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    if "num_key_value_heads" in text:
        text["num_key_value_heads"] = 2
    if "head_dim" in text:
        text.update(head_dim=16, query_pre_attn_scalar=16)
    if "rope_scaling" in text and "mrope_section" in text["rope_scaling"]:
        text["rope_scaling"] = {**text["rope_scaling"], "mrope_section": [2, 3, 3]}  # half of head_dim 16
    if "depth" in vision:  # Qwen2.5-VL's tower
        vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
    else:
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        if "projection_dim" in vision:
            vision["projection_dim"] = 32
    return config


def _twin_ids(config: dict[str, Any], twin_config: dict[str, Any]) -> None:
    """Special tokens at the twin tokenizer's ids (the processor writes the twin's image token)."""
    for key, value in twin_config.items():
        if "token_id" in key or "token_index" in key:
            config[key] = value
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in twin_config.get("text_config", {}):
            config["text_config"][key] = twin_config["text_config"][key]


def _real_image_settings(processor: dict[str, Any], config: dict[str, Any]) -> None:
    model_type, vision = config["model_type"], config["vision_config"]
    image = processor["image_processor"]
    if model_type == "llava":
        size = vision["image_size"]
        image.update(crop_size={"height": size, "width": size}, size={"shortest_edge": size})
        processor["patch_size"] = vision["patch_size"]
    elif model_type == "qwen2_5_vl":
        image["size"] = {"shortest_edge": 56 * 56, "longest_edge": QWEN_MAX_PIXELS}
    elif model_type == "gemma3":
        image["size"] = {"height": vision["image_size"], "width": vision["image_size"]}
        processor["image_seq_length"] = config["mm_tokens_per_image"]
    else:  # pragma: no cover - MODELS names the three above
        raise ValueError(model_type)


def random_real_model(real: str, out: Path, device: str, dtype: torch.dtype, shrink: bool) -> Path:
    """A model folder: the preset's architecture (``shrunk`` on a CPU) with random weights in ``dtype``, its twin's
    tokenizer and chat template with the real image settings, and a preset YAML beside it naming the folder and
    carrying the architecture built (so ``unconfuse plan`` plans exactly this model)."""
    import yaml
    from transformers import AutoConfig, AutoModelForImageTextToText

    from unconfuse.eval.home import built_model_dir
    from unconfuse.eval.models.architecture import architecture_of, parameter_count
    from unconfuse.eval.world import prepare

    twin = MODELS[real][0]
    prepare(models=[twin])
    twin_dir = built_model_dir(twin)
    arch = architecture_of(real)
    config = copy.deepcopy(arch["config"])
    _twin_ids(config, json.loads((twin_dir / "config.json").read_text()))
    if shrink:
        config = shrunk(config)
    settings = dict(config)
    hf_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)
    model.tie_weights()
    folder = out / real
    model.save_pretrained(folder)
    for name in PROCESSOR_FILES:
        if (twin_dir / name).exists():
            shutil.copy(twin_dir / name, folder / name)
    processor = json.loads((folder / "processor_config.json").read_text())
    _real_image_settings(processor, config)
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    tokens = image_tokens_of(folder, config)
    if tokens != arch["image_tokens"]:
        raise RuntimeError(f"{real}: the processor gives {tokens} image tokens for a 504-px image, the architecture "
                           f"block says {arch['image_tokens']}")
    preset = out / f"{real}-random.yaml"
    preset.write_text(yaml.safe_dump({
        "family": "hf-vlm", "model_id": str(folder), "dtype": str(dtype).removeprefix("torch."),
        "architecture": {"source": f"random weights of {real}'s architecture" + (" (shrunk)" if shrink else ""),
                         "parameters": parameter_count(model), "image_tokens": arch["image_tokens"], "config": config}}))
    del model
    return preset


def image_tokens_of(folder: Path, config: dict[str, Any]) -> int:
    """Image tokens the folder's processor writes for one MediConfusion-sized (504 x 504) image."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                                         add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=[[Image.new("RGB", (504, 504))]], return_tensors="pt")["input_ids"][0]
    image_id = next(config[key] for key in ("image_token_index", "image_token_id") if key in config)
    return int((ids == image_id).sum())


def train_row(real: str, recipe: str, preset: Path, data: dict[str, Path], work: Path, steps: int, shrink: bool,
              cuda: bool) -> dict[str, Any]:
    """One recipe at this size: peak memory against the plan, samples/s, and the plain script's."""
    from bench import train_overhead
    from unconfuse.cli.plan import make_plan

    config = REPO / "configs" / recipe / f"{MODELS[real][1]}.yaml"
    overrides = [f"model={preset}", *(f"data.{s}={data[s]}" for s in ("train", "val", "test")), "data.retention=none",
                 "train.activation_checkpointing=true", f"train.bf16={cuda}", "val_batch_pairs=4"]
    if shrink:
        overrides += ["train.pairs_per_batch=1", *(["grpo.num_generations=2"] if recipe == "mllm_grpo" else [])]
    plan = make_plan(recipe, str(config), overrides)
    release(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    captured = train_overhead.run_recipe_captured(recipe, steps, work / recipe, config=config, overrides=overrides)
    row: dict[str, Any] = {"plan_GB": round(plan.peak / 1e9, 1)}
    if cuda:
        reserved = torch.cuda.max_memory_reserved()
        row.update(peak_reserved_GB=round(reserved / 1e9, 1), peak_allocated_GB=round(torch.cuda.max_memory_allocated() / 1e9, 1),
                   measured_over_plan=round(reserved / plan.peak, 2),
                   # where a miss comes from: what the loop started with against the plan's weights, and the plan's
                   # activations (the rest of the peak)
                   start_allocated_GB=round(captured["clock"].allocated_at_start / 1e9, 1),
                   plan_weights_GB=round(plan.weights / 1e9, 1),
                   plan_activations_GB=round(plan.activations["on"] / 1e9, 1))
    samples = steps * plan.sequence["items"]
    row["samples_per_s"] = round(samples / captured["timed"].seconds, 2)
    plain = train_overhead.train_plain(train_overhead.plain_trainer(recipe, captured, work / f"{recipe}-plain"))
    row["plain_samples_per_s"] = round(samples / plain.seconds, 2)
    row["recipe_over_plain"] = round(plain.seconds / captured["timed"].seconds, 3)
    if recipe != "mllm_dpo":  # the same job: the curves must agree (dpo here adds the image-contrast term; grpo's
        # numbers are its generation batches' |advantage| sums: equal when both sampled the same rollouts)
        row["max_loss_difference"] = max(abs(a - b) for a, b in zip(plain.losses, captured["timed"].losses))
    del captured
    return row


def plain_loop(backend, bench, pairs, mode: str, batch: int) -> float:
    """Questions per second of what a user writes with transformers alone: chat template, processor, forward
    (greedy: the two letters' logits at the last position) or generate (mc)."""
    from unconfuse.eval.images import load_image
    from unconfuse.eval.prompts import load_prompts

    prompts, processor, model = load_prompts(), backend.processor, backend.model
    processor.tokenizer.padding_side = "left"
    items = [(prompts.render(mode, p.question, p.options), load_image(bench.resolve_image(p.image(s))))
             for p in pairs for s in (1, 2)]
    letters = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("A", "B")]
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                                               add_generation_prompt=True, tokenize=False) for text, _ in chunk]
        inputs = processor(text=texts, images=[[image] for _, image in chunk], padding=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            if mode == "greedy":
                model(**inputs).logits[:, -1, letters].argmax(-1).tolist()
            else:
                model.generate(**inputs, max_new_tokens=32, do_sample=False)
    return len(items) / (time.perf_counter() - start)


def eval_row(preset: Path, test: Path, work: Path, device: str, n_pairs: int) -> dict[str, Any]:
    """Greedy and mc on ``n_pairs`` pairs through ``unconfuse eval`` (once end to end, then timed on the loaded
    model: the runner's batches of 8 pairs) against the plain loop, and the near ties and flips between batch
    sizes 1 and 16 (greedy)."""
    from unconfuse.eval.benchmarks import load_benchmark
    from unconfuse.eval.models import load_model
    from unconfuse.eval.prompts import load_prompts
    from unconfuse.eval.runner import EvalConfig, answer_pairs, run_eval
    from unconfuse.eval.scorer import NOISE_BANDS, near_ties

    row: dict[str, Any] = {}
    bench = load_benchmark(str(test))
    pairs = bench.pairs[:n_pairs]
    # the runner's scoring and generation (16 questions a batch) on the loaded model, as `unconfuse eval` runs them
    run_eval(EvalConfig(model=str(preset), mode="greedy", benchmark=str(test), out=str(work / "eval-greedy"),
                        limit=n_pairs, batch_size=8, device=device, progress=False))
    release(device == "cuda")  # run_eval's copy of the model, before the timed one is loaded
    backend, spec = load_model(str(preset), device=device)
    for mode in ("greedy", "mc"):
        cfg = EvalConfig(model=str(preset), mode=mode, benchmark="", out="")
        start = time.perf_counter()
        for k in range(0, len(pairs), 8):
            answer_pairs(backend, spec, cfg, load_prompts(), bench, pairs[k:k + 8])
        row[f"{mode}_q_per_s"] = round(2 * len(pairs) / (time.perf_counter() - start), 2)
        row[f"plain_{mode}_q_per_s"] = round(plain_loop(backend, bench, pairs, mode, 16), 2)
    cfg = EvalConfig(model=str(preset), mode="greedy", benchmark="", out="")
    few = pairs[:16]
    alone = [r for p in few for r in answer_pairs(backend, spec, cfg, load_prompts(), bench, [p])]
    together = [r for k in range(0, len(few), 8) for r in answer_pairs(backend, spec, cfg, load_prompts(), bench, few[k:k + 8])]
    ties = near_ties(together) or {"count": 0, "scored": 0}
    band = NOISE_BANDS.get(together[0].get("dtype"), 0.0)
    row.update(near_ties=f"{ties['count']} of {ties['scored']}", flips_outside_band=sum(
        a["answer"] != b["answer"] and abs(a["margin"]) >= band for a, b in zip(alone, together)),
        largest_margin_change=max(abs(a["margin"] - b["margin"]) for a, b in zip(alone, together)))
    return row


def release(cuda: bool) -> None:
    """Free what the last measurement held before the next is measured: a Trainer sits in reference cycles (callbacks,
    the bench's wrapped methods), so its model leaves the GPU only at a garbage collection, and a model left over
    would count in the next run's peak memory (or leave no room for it)."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


class Budget:
    """Wall-time budget for the whole run (the device tool stops a command at 600 s): a measurement is skipped when
    the time spent plus the longest measurement so far would pass it, so what ran is kept and reported."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start, self.longest = seconds, time.perf_counter(), 0.0

    def skip(self) -> str | None:
        spent = time.perf_counter() - self.start
        if self.seconds is not None and spent + self.longest > self.seconds:
            return (f"skipped: {spent:.1f} s spent, the longest measurement took {self.longest:.1f} s, "
                    f"budget {self.seconds:g} s")
        return None

    def measure(self, fn, *args) -> Any:
        """``fn(*args)``, or a one-line failure (a bench reports each failure and goes on to the next measurement)."""
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.longest = max(self.longest, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from bench.gpu_smoke import random_pairs
    from unconfuse.eval.io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="the same code path at reduced width, on the CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--recipes", default="mllm_sft,mllm_dpo,mllm_grpo")
    parser.add_argument("--budget-s", type=float, help="skip what would end past this many seconds (default: 540 on "
                        "CUDA, to stay inside the device tool's 600-s command limit; none on the CPU)")
    parser.add_argument("--work", help="where models and runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run_on_cpu
    if not cuda and not args.dry_run_on_cpu:
        sys.exit("gpu_scale.py needs a CUDA device (or --dry-run-on-cpu)")
    budget = Budget(args.budget_s if args.budget_s is not None else (540.0 if cuda else None))
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n_eval = 176 if cuda else 4
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_scale_"))
    sizes = (480, 560) if cuda else (300, 340)  # MediConfusion's images are ~500 px a side
    # the training runs score a small test set before and after (scoring speed is the eval row's measurement)
    data = {split: random_pairs(work / split, n, seed, sizes=sizes)
            for split, n, seed in (("train", 16, 0), ("val", 4, 1), ("test", 4, 3), ("eval", n_eval, 2))}
    table = Path(os.environ["OUT"], "gpu_scale.json") if os.environ.get("OUT") else None
    rows: list[dict[str, Any]] = []
    recipes = args.recipes.split(",")

    def report(real: str, key: str) -> None:  # each measurement as it ends: a run stopped later keeps it
        print(json.dumps({real: {key: rows[-1][key]}}), flush=True)
        if table is not None:
            atomic_write_json(table, rows)

    for real in args.models.split(","):
        rows.append({"model": real})
        start = time.perf_counter()
        preset = budget.skip() or budget.measure(random_real_model, real, work / "models", device, dtype, not cuda)
        rows[-1]["build_s"] = round(time.perf_counter() - start, 1)
        if not isinstance(preset, Path):  # no model: every measurement of it is that reason
            rows[-1].update({key: preset for key in (*recipes, "eval")})
            report(real, "eval")
            continue
        for recipe in recipes:  # each train_row frees what came before it, then measures its peak
            rows[-1][recipe] = budget.skip() or budget.measure(
                train_row, real, recipe, preset, data, work / "runs" / real, args.steps, not cuda, cuda)
            report(real, recipe)
        rows[-1]["eval"] = budget.skip() or budget.measure(eval_row, preset, data["eval"], work / "runs" / real, device,
                                                           n_eval)
        release(cuda)  # the eval row's model, before the next model is built
        report(real, "eval")
    print("\n" + json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
