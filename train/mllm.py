"""What the MLLM recipes share: their data and LoRA settings, the letter examples, loading the model
with LoRA placed per part, scoring (with the image cache kept honest), and adapter merging."""
from __future__ import annotations

import copy
import json
import re
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from peft.utils.other import ModulesToSaveWrapper

from unconfuse.eval.evaluation import predict, score_records, shared_between_processes
from unconfuse.eval.images import load_image
from unconfuse.eval.models import load_model, resolve_model
from unconfuse.eval.retention import answer_mllm
from unconfuse.train.config import ConfigError, RecipeSettings, Settings, TrainSettings, setting
from unconfuse.train.distributed import gathered, process_device, whole_weights
from unconfuse.train.replay import FRACTION_HELP, REPLAY_HELP, question_items, wrong_option

# Where image-text-to-text architectures keep their parts (module-name suffixes): LLaVA, LLaVA-NeXT and
# Gemma 3 have a multi_modal_projector beside a vision_tower; Qwen2/2.5-VL keep the projector (merger)
# inside their tower, `visual`. LLaVA-NeXT's raw `image_newline` parameter is neither: LLaVA-NeXT trains it
# with the language model, so it stays frozen here (the language model only gets LoRA).
LANGUAGE_MODELS = ("language_model",)
PROJECTORS = ("multi_modal_projector", "visual.merger")
VISION_TOWERS = ("vision_tower", "visual")
LM_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LM_MLP = ("gate_proj", "up_proj", "down_proj")
LM_LINEARS = LM_ATTENTION + LM_MLP

EvalMode = Literal["greedy", "prefix", "mc"]
Part = Literal["none", "lora", "full"]


@dataclass
class MllmData(Settings):
    """The pairs and how each image becomes an example."""

    train: str = setting("world:train", "training pairs: any benchmark argument (folder, file, hf:<id>, world:<split>)")
    val: str = setting("world:val", "validation pairs: select the checkpoint (never the test pairs)")
    test: str = setting("world:test", "test pairs: scored before and after training, never for selection")
    prompt_mode: Literal["greedy", "mc"] = setting("greedy", "whose prompt the examples use (the eval prompt of that mode)")
    retention: str = setting("auto", "held-out single-image questions scored before and after training (what the "
                                     "mitigation costs): auto (the world's, for world data), none, a JSONL file or folder, "
                                     "or hf:<id>[:<split>] (VQA-RAD / SLAKE style closed-ended questions)")
    val_retention: str = setting("auto", "the validation side's retention questions (train.selection with a retention "
                                         "floor only); never the test side's")
    retention_mode: Literal["greedy", "prefix"] = setting(
        "prefix", "how retention questions are answered: prefix scores each option as the reply (general knowledge, "
                  "as pretraining asked it); greedy, the letter of a multiple-choice prompt (also format compliance)")
    answer_with_option: bool = setting(False, "reply 'A: <option text>' instead of 'A'")
    swap_options: bool = setting(True, "present the options swapped (answers flipped) for half of the pairs, so no "
                                       "letter prior can be learned")
    replay: str = setting("none", REPLAY_HELP + "; an MLLM replays single-image questions (sft: the right option's "
                                  "text as the reply, LLaVA conversations too; dpo: it preferred over another option; "
                                  "grpo: the right letter of two options rewarded)")
    replay_fraction: float = setting(0.5, FRACTION_HELP)
    replay_answer: Literal["option", "letter"] = setting(
        "option", "how a replay question is asked and answered (sft, dpo): option: as retention's prefix mode asks, the "
                  "plain question answered with the right option's text; letter: as the pairs are, the right option and "
                  "one other as lettered options in the scoring mode's prompt, answered with the letter (grpo: always)")


@dataclass
class MllmLora(Settings):
    """LoRA on the language model; the projector and the vision tower optionally."""

    r: int = setting(16, "LoRA rank", min=1)
    alpha: int = setting(32, "LoRA alpha (scale = alpha / r)", min=1)
    dropout: float = setting(0.05, "LoRA dropout", min=0)
    lm: Literal["all", "attention", "mlp"] = setting("all", "which projections of the language model get LoRA: "
                                                           "attention and MLP, attention (q, k, v, o) only, or MLP "
                                                           "(gate, up, down) only")
    projector: Part = setting("none", "the multimodal projector: frozen, LoRA, or trained in full")
    vision: Part = setting("none", "the vision tower: frozen, LoRA, or trained in full")
    anchor_weight: float = setting(0.0, "L2-SP anchor: this weight x the squared distance of the modules trained in "
                                        "full (projector/vision: full) from the base's weights, added to the loss "
                                        "(keeps what the base saw; 0: off; an error with nothing trained in full)", min=0)


@dataclass
class MllmRecipeSettings(RecipeSettings):
    """The settings the MLLM recipes share (each recipe's config subclasses this and adds its own section)."""

    model: str = setting("tiny-llava-base", "preset, local folder or hub id of an image-text-to-text model")
    data: MllmData = setting(help="the pairs, and how each image is asked (examples, prompts)", factory=MllmData)
    lora: MllmLora = setting(help="LoRA placement", factory=MllmLora)
    train: TrainSettings = setting(help="training settings", factory=TrainSettings)
    val_mode: EvalMode = setting("greedy", "scoring mode of the validation loop (mc generates: slow)")
    test_modes: list[EvalMode] = setting(help="scoring modes of the test split; the val mode is the main one "
                                              "(base/, test/), others go to base-<mode>/, test-<mode>/",
                                         factory=lambda: ["greedy", "prefix", "mc"])
    val_batch_pairs: int = setting(8, "pairs per batch when scoring val and test", min=1)
    init_adapters: str | None = setting(None, "start from another run's selected adapters (a finished run folder, or "
                                              "a cv folder: each fold starts from the same fold): sft first, then "
                                              "preference or RL. Its LoRA placement must be this run's, and its "
                                              "training data too (a warm start from other data would leak)")


@dataclass
class Placement:
    """Where LoRA adapters go and what trains in full, as exact module names of one model."""

    lora: dict[str, list[str]]  # part -> linear layers adapted
    full: list[str]  # modules trained in full (peft modules_to_save)


def _find(model, suffixes: tuple[str, ...]) -> str | None:
    """The outermost module whose name ends with one of ``suffixes`` (whole name components)."""
    names = [name for name, _ in model.named_modules() if any(name == s or name.endswith("." + s) for s in suffixes)]
    return min(names, key=len) if names else None


def lora_placement(model, settings: MllmLora) -> Placement:
    """LoRA on the language model's attention and MLP projections, plus the parts ``settings`` asks
    for, located on this architecture. A setting the architecture cannot take (no such part, a
    projector without linear layers, a projector inside a fully trained tower) is a ConfigError
    that names the architecture, never a silent no-op."""
    arch = getattr(model.config, "model_type", type(model).__name__)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    parts = {"language model": _find(model, LANGUAGE_MODELS), "projector": _find(model, PROJECTORS),
             "vision": _find(model, VISION_TOWERS)}
    if parts["language model"] is None:
        raise ConfigError(f"{arch}: no language_model module found; LoRA cannot be placed on this architecture")

    def under(part: str) -> list[str]:
        return [n for n in linears if n.startswith(parts[part] + ".")]

    projector = parts["projector"]
    inside_tower = projector is not None and parts["vision"] is not None and projector.startswith(parts["vision"] + ".")
    lm_linears = {"all": LM_LINEARS, "attention": LM_ATTENTION, "mlp": LM_MLP}[settings.lm]
    lora = {"language model": [n for n in under("language model") if n.rpartition(".")[2] in lm_linears]}
    full: list[str] = []
    for part in ("projector", "vision"):
        choice = getattr(settings, part)
        if choice != "none" and parts[part] is None:
            raise ConfigError(f"lora.{part}: {choice}: {arch} has no {part} module ({' or '.join(PROJECTORS if part == 'projector' else VISION_TOWERS)})")
        if choice == "lora":
            lora[part] = [n for n in under(part) if not (part == "vision" and projector and n.startswith(projector + "."))]
            if not lora[part]:
                raise ConfigError(f"lora.{part}: lora cannot apply to {arch}: {parts[part]} has no linear layer "
                                  f"(use full or none)")
        elif choice == "full":
            full.append(parts[part])
    if inside_tower and settings.vision == "full" and settings.projector != "full":
        raise ConfigError(f"lora.vision: full also trains {arch}'s projector ({projector} lives in {parts['vision']}): "
                          f"set lora.projector: full too")
    if inside_tower and settings.vision == "full":
        full.remove(projector)  # trained as part of the tower
    if not lora["language model"]:
        raise ConfigError(f"lora.lm: {settings.lm}: {arch}'s language model has none of {', '.join(lm_linears)}")
    return Placement(lora, full)


def lora_config(model, settings: MllmLora):
    """The peft LoraConfig of ``lora_placement``: adapters on exactly the named linear layers."""
    placement = lora_placement(model, settings)
    targets = [name for names in placement.lora.values() for name in names]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules="(" + "|".join(re.escape(t) for t in targets) + ")",
                      modules_to_save=placement.full or None, task_type="CAUSAL_LM")


def load_mllm(run, recipe: str):
    """The run's image-text-to-text model on this process's device, in the run's dtype (bf16 when
    ``train.bf16``, else the preset's), seeded: ``(backend, spec)``. Create the trainer arguments
    first: under ZeRO-3 the weights are then partitioned across processes as they load."""
    spec = resolve_model(run.cfg.model)
    if spec.family != "hf-vlm":
        raise ConfigError(f"model: {recipe} trains image-text-to-text models; {run.cfg.model!r} is {spec.family}")
    if run.cfg.train.bf16:
        spec = replace(spec, dtype="bfloat16")
    torch.manual_seed(run.cfg.train.seed)
    backend, spec = load_model(spec, device=process_device())
    sharded = [p for p in backend.model.parameters() if hasattr(p, "ds_id")]
    if sharded and run.is_main:
        print(f"ZeRO-3: {len(sharded)} parameter tensors of {spec.name} partitioned across processes as they loaded", flush=True)
    return backend, spec


def attach_lora(backend, settings: MllmLora, seed: int):
    """The model with LoRA adapters; the eval backend keeps seeing it (the layers live in its base model)."""
    config = lora_config(backend.model, settings)
    torch.manual_seed(seed)  # LoRA init must not depend on whether the base model was just built
    model = get_peft_model(backend.model, config)
    backend.model = model.get_base_model()
    return model


def anchored_parameters(model) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(trained parameter, its base weights) of every module trained in full: peft's ``modules_to_save`` copy of the
    active adapter beside the frozen original it was copied from (the base, also under a warm start)."""
    pairs = []
    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            trained = dict(wrapper.modules_to_save[wrapper.active_adapters[0]].named_parameters())
            pairs += [(trained[name], base.detach()) for name, base in wrapper.original_module.named_parameters()]
    return pairs


class AnchoredToBase:
    """For the MLLM recipes' trainers: adds ``anchor_weight`` x the squared L2 distance of the modules trained in full
    from the base's weights (L2-SP, Li et al., ICML 2018) to every optimizer step's loss, logged as ``anchor``.
    It pulls back what the pair loss does not move (Adam moves every parameter at the learning rate's scale,
    so weights the pairs do not need drift otherwise). Not under ZeRO-3 (each process holds a shard)."""
    def __init__(self, *args, anchor_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.anchor_weight = anchor_weight
        self.anchored = anchored_parameters(self.model) if anchor_weight else []
        if anchor_weight and not self.anchored:
            raise ConfigError(f"lora.anchor_weight: {anchor_weight} anchors the modules trained in full, and none is "
                              f"(set lora.projector or lora.vision to full, or the weight to 0)")
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        if anchor_weight and plugin is not None and plugin.zero_stage == 3:
            raise ConfigError("lora.anchor_weight: not under ZeRO-3 (each process holds a shard of the weights); "
                              "use ZeRO-2 or set it to 0")

    def anchor_term(self) -> torch.Tensor:
        """The squared L2 distance of the modules trained in full from the base's weights (unweighted)."""
        return sum((trained - base).pow(2).sum() for trained, base in self.anchored)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.anchor_weight or not self.model.training:
            return result
        term = self.anchor_term()
        self._metrics["train"]["anchor"].append(term.item())
        scaled = self.anchor_weight * term
        # once per optimizer step: the Trainer divides a loss by the accumulation steps unless it was
        # normalized by num_items_in_batch (then the model's loss already is a share of the step's)
        ga_scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        if ga_scaled:
            scaled = scaled / self.current_gradient_accumulation_steps
        if return_outputs:
            return result[0] + scaled, result[1]
        return result + scaled


def with_eval_bos(processor):
    """The processor TRL tokenizes with, giving training rows the BOS eval prompts carry.

    TRL tokenizes rendered chats with ``add_special_tokens=False`` (it expects templates to write BOS);
    templates that do not (LLaVA-1.5/NeXT, LLaVA-Med's Mistral) would train without the BOS that eval,
    transformers' ``apply_chat_template`` and the models' own training code put first. Here, text that
    comes with its images and does not start with BOS is tokenized with the tokenizer's BOS, as eval
    does; completions (no images) and templates that write BOS are untouched. A copy: the backend's
    processor, which eval uses and checkpoints save, is not changed."""
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    if not bos:
        return processor
    base = type(processor)

    def __call__(self, images=None, text=None, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        if images is not None and texts and not all(t.startswith(bos) for t in texts):
            kwargs["add_special_tokens"] = True
        return base.__call__(self, images=images, text=text, *args, **kwargs)

    # same class name: the checkpoints' processor_config.json must still name the real processor class
    trained = copy.copy(processor)
    trained.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
    return trained


def evaluator(run, spec, backend, trainer, vision_trains: bool):
    """``evaluate(bench, mode, base=False)`` for the lifecycle: the eval code path on the model being
    trained (``base``: with its adapters disabled, i.e. the base model). Every process scores its share
    of the pairs on whole weights (under ZeRO-3 they are gathered for the pass, as TRL does for
    generation). Cached image features are dropped when the vision side trains (they would be stale)."""

    def evaluate(bench, mode: str, base: bool = False):
        with whole_weights(trainer), (trainer.model.disable_adapter() if base else nullcontext()):
            backend.model.eval()
            if vision_trains:
                backend.clear_cache()
            records = predict(backend, spec, mode, bench, run.prompts, run.cfg.val_batch_pairs)
            backend.model.train()
        if vision_trains:
            backend.clear_cache()
        return records, score_records(bench, records, prompt_version=run.prompts.version)

    return evaluate


def retention_evaluator(run, backend, trainer):
    """``retain(rset, base=False)``: retention records of the model being trained (``base``: adapters disabled),
    in ``data.retention_mode``; each process answers its share of the questions (gathered)."""

    def retain(rset, base: bool = False):
        with whole_weights(trainer), (trainer.model.disable_adapter() if base else nullcontext()):
            backend.model.eval()
            records = shared_between_processes(rset.questions, lambda share: answer_mllm(
                backend, rset, run.cfg.data.retention_mode, share, batch=run.cfg.val_batch_pairs * 2))
            backend.model.train()
        return records

    return retain


def load_best_adapters(run, model) -> None:
    """Put the selected adapters (``checkpoints/best``) into ``model`` in place, for the final test: no
    second copy of the base model is loaded (under ZeRO-3 the adapters are written into their shards)."""
    load_adapters(run.best_dir, model)


def load_adapters(folder, model) -> None:
    """Put the adapters saved in ``folder`` into ``model`` in place (under ZeRO-3 written into their shards)."""
    weights = load_peft_weights(str(folder), device="cpu")
    with gathered([p for p in model.parameters() if p.requires_grad], modifier_rank=0):
        result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise RuntimeError(f"{folder}: adapter weights this model does not have: {result.unexpected_keys[:3]}")


def warm_start(model, best) -> None:
    """Load the adapters the run starts from (``run.init_adapters``: a checked ``checkpoints/best``; None: a fresh
    start) into the freshly attached LoRA ``model``; their settings (targets, rank, modules trained in full) must
    be this run's."""
    if best is None:
        return
    saved, ours = json.loads((best / "adapter_config.json").read_text()), model.peft_config["default"].to_dict()
    for key in ("target_modules", "r", "lora_alpha", "modules_to_save"):
        theirs, mine = saved.get(key), ours.get(key)
        if (sorted(theirs) if isinstance(theirs, list) else theirs) != (sorted(mine) if isinstance(mine, (list, set)) else mine):
            raise ConfigError(f"init_adapters: {best.parent.parent}: its LoRA {key} ({theirs!r}) is not this run's "
                              f"({mine!r}); set the same lora.* as the run it starts from")
    load_adapters(best, model)


def letter_examples(bench, prompts, cfg: MllmData, seed: int) -> list[dict[str, Any]]:
    """Per image, in pair order (items 2k, 2k+1): the image, the prompt as presented (options swapped
    with the answer for half of the pairs when ``swap_options``) and the correct and other replies."""
    rng = np.random.default_rng(seed)
    images: dict[str, Any] = {}
    examples = []
    for pair in bench.pairs:
        swap = cfg.swap_options and bool(rng.random() < 0.5)
        options = (pair.option_b, pair.option_a) if swap else pair.options
        prompt = prompts.render(cfg.prompt_mode, pair.question, options)

        def reply(letter: str) -> str:
            return f"{letter}: {options['AB'.index(letter)]}" if cfg.answer_with_option else letter

        for side in (1, 2):
            ref = pair.image(side)
            if ref not in images:
                images[ref] = load_image(bench.resolve_image(ref))
            correct = pair.answer(side)
            if swap:
                correct = "B" if correct == "A" else "A"
            other = "B" if correct == "A" else "A"
            examples.append({"image": images[ref], "prompt": prompt, "correct": reply(correct), "other": reply(other)})
    return examples


def replay_examples(run, kind: Literal["sft", "dpo", "grpo"], prompts, seed: int) -> list[dict[str, Any]]:
    """The run's replay items (``run.replay``) as rows of ``kind``, each marked ``"replay": True``: an SFT
    conversation (the question and its right answer; a LLaVA conversation as it is), a DPO row (the right answer
    chosen over one other option), or a GRPO prompt rewarded for the right letter (``pair_id`` -1: no pair term).
    ``data.replay_answer`` says how a question is asked: the plain question answered with the option's text, or
    (always for GRPO) the right option and one other as lettered options in the scoring mode's prompt, answered
    with the letter. Empty without replay."""
    if run.replay is None:
        return []
    rng = np.random.default_rng(seed)
    images: dict[str, Any] = {}

    def image(item):
        if item.image not in images:
            images[item.image] = load_image(run.replay.resolve_image(item.image))
        return images[item.image]

    rows: list[dict[str, Any]] = []
    letter = kind == "grpo" or run.cfg.data.replay_answer == "letter"
    for item in question_items(run.replay, run.cfg.data.replay, conversations=kind == "sft"):
        if item.question is None:  # a LLaVA conversation (sft)
            messages = [{"role": role, "content": text} for turn in item.turns
                        for role, text in zip(("user", "assistant"), turn)]
            rows.append({"images": [image(item)], "messages": messages, "replay": True})
            continue
        right, wrong = item.correct_option, wrong_option(item, seed)
        if letter:  # the right option and another as lettered options, in random order
            first = int(rng.random() < 0.5)
            options = (wrong, right) if first else (right, wrong)
            question = prompts.render(run.cfg.data.prompt_mode, item.question, options)
            right, wrong = "AB"[first], "AB"[1 - first]
        else:
            question = item.question
        user = [{"role": "user", "content": question}]
        if kind == "sft":
            rows.append({"images": [image(item)], "messages": [*user, {"role": "assistant", "content": right}], "replay": True})
        elif kind == "dpo":
            rows.append({"images": [image(item)], "prompt": user, "chosen": [{"role": "assistant", "content": right}],
                         "rejected": [{"role": "assistant", "content": wrong}], "replay": True})
        else:
            rows.append({"images": [image(item)], "prompt": user, "answer": right, "pair_id": -1, "side": 0, "replay": True})
    return run.replay_rows(rows)
