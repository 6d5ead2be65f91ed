"""mllm_grpo: reinforcement learning of an MLLM on confusing pairs, rewarding set accuracy itself (TRL GRPOTrainer).

Rollouts answer each image's question: the prompt is eval's and sft's (``letter_examples``: the scoring
mode's multiple-choice prompt, options swapped for half of the pairs, the eval BOS), and each image's prompt
is sampled ``num_generations`` times (temperature > 0). ``rollouts: text``: the model writes its answer, a
letter and the end of turn (``max_completion_length`` is a few tokens), read by eval's strict parser (the mc
mode's; a bare ``A`` or ``B: ...`` is that letter, anything unreadable is invalid and earns nothing).
``rollouts: letters``: one token sampled among the two eval's greedy mode compares, i.e. greedy mode's choice
as a policy, for models that never write a letter unprompted (the tiny base: docs/results.md).
The reward::

    reward(k of image i) = right(i, k) + pair_weight * right(i, k) * mean_j right(partner, j)

The pair term pays only for the set-accuracy event, both images of a pair answered right (they need
different letters), which no likelihood objective targets. Each completion is paired with the *mean* over
the partner's completions rather than with the partner's k-th: the expectation is the same, the variance is
lower, and ``right_i * p_partner`` is what the gradient of the pair's set accuracy ``p_i * p_partner`` asks
of image i: push an image toward its answer in proportion to how often its partner is already right. On a
confused pair (one letter for both images) that weights the image answered wrong, whose partner is right,
above the one answered right, whose partner is wrong: the letter prior stops paying. The factor is constant
within an image's group, so GRPO's per-group std scaling would divide it out: ``scale_rewards`` is ``batch``
(one std over the batch) or ``none``, never ``group``.

Whole pairs per batch: the sampler (``PairRepeatSampler``) puts both images of a pair and all their rollouts in
the same generation batch and the same process's slice of it; a reward batch without a pair's partner is an
error, never a silent zero. ``train.pairs_per_batch`` counts pairs per device step, so a step holds
``2 * pairs_per_batch * num_generations`` completions. LoRA as in the other MLLM recipes; the KL reference
(``beta`` > 0) is the base model, reached by disabling the adapters, as mllm_dpo's.

    unconfuse train mllm_grpo --config configs/mllm_grpo/tiny.yaml [key=value ...]

Story: data (run directory, pairs, leakage audit) -> trainer arguments (before the model: ZeRO-3 partitions
it as it loads) -> model (+ LoRA) -> trainer (GRPOTrainer, whole-pair generation batches, letter + pair rewards)
-> base test scores (adapters disabled) -> validation callback -> train -> test scores of the selected adapters,
loaded in place. Shares its data and LoRA settings with mllm_sft and mllm_dpo.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from trl import GRPOConfig, GRPOTrainer

from unconfuse.eval.pairs import Benchmark
from unconfuse.eval.runs import RunResults
from unconfuse.eval.scorer import parse_strict
from unconfuse.recipes import recipe_cli
from unconfuse.train import lifecycle
from unconfuse.train.checkpoints import trainer_arguments
from unconfuse.train.config import Settings, setting, to_dict
from unconfuse.train.data import PairRepeatSampler
from unconfuse.train.mllm import (AnchoredToBase, MllmData, MllmRecipeSettings, attach_lora, evaluator, letter_examples,
                                  load_best_adapters, load_mllm, replay_examples, retention_evaluator, warm_start,
                                  with_eval_bos)
from unconfuse.train.replay import with_replay

RECIPE = "mllm_grpo"


@dataclass
class GrpoSettings(Settings):
    """Rollouts, the reward and GRPO's loss."""

    num_generations: int = setting(8, "completions sampled per image (GRPO's group); a step holds "
                                      "2 x pairs_per_batch x num_generations completions", min=2)
    rollouts: Literal["text", "letters"] = setting("text", "text: free text of up to max_completion_length tokens, "
                                                           "read by eval's strict parser; letters: one token sampled "
                                                           "among the two eval's greedy mode compares (models that "
                                                           "never write a letter unprompted, like the tiny base)")
    max_completion_length: int = setting(4, "most tokens per text rollout: a letter and the end of turn", min=1)
    temperature: float = setting(1.0, "sampling temperature of the rollouts (> 0: exploration)", gt=0)
    pair_weight: float = setting(1.0, "weight of the pair term (paid when both images of a pair are right); "
                                      "0 = the letter reward alone", min=0)
    scale_rewards: Literal["batch", "none"] = setting("batch", "advantage scaling: one std over the batch, or none "
                                                               "(per-group scaling would cancel the pair term)")
    beta: float = setting(0.0, "KL coefficient toward the base model (adapters disabled); 0 = no KL term", min=0)


@dataclass
class MllmGrpoConfig(MllmRecipeSettings):
    """mllm_grpo's settings: YAML keys, or ``key=value`` on the command line."""

    strategy: str | None = setting(None, "name that groups runs in compare and W&B (default: grpo, or grpo-letter "
                                         "when grpo.pair_weight is 0; +replay with data.replay)")
    grpo: GrpoSettings = setting(help="rollouts, reward and loss", factory=GrpoSettings)


CONFIG_CLASS = MllmGrpoConfig


def rollout_prompts(bench: Benchmark, prompts, cfg: MllmData, seed: int) -> list[dict[str, Any]]:
    """One prompt per image (rows 2k, 2k+1 are pair k's), with what the reward needs: the right letter
    (as presented: options may be swapped), the pair's index in ``bench`` and the image's side (0 or 1)."""
    return [{"images": [ex["image"]], "prompt": [{"role": "user", "content": ex["prompt"]}],
             "answer": ex["correct"][0], "pair_id": row // 2, "side": row % 2}
            for row, ex in enumerate(letter_examples(bench, prompts, cfg, seed))]


def completion_text(completion) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": text}]``."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    return completion if isinstance(completion, str) else ""


def pair_rewards(completions: list, answer: list[str], pair_id: list[int], side: list[int]) -> tuple[list[float], list[float]]:
    """Per completion: ``(right, pair term)``. ``right`` is 1 when the completion's letter (eval's strict parser)
    is the image's answer; the pair term is ``right`` times the share of right completions of the pair-partner
    image in the same batch (0 for a replay prompt: ``pair_id`` -1). A batch holding an image without its partner's
    rollouts is an error."""
    right = [float(parse_strict(completion_text(c)) == a) for c, a in zip(completions, answer, strict=True)]
    totals: dict[tuple[int, int], list[float]] = {}
    for r, p, s in zip(right, pair_id, side):
        if p >= 0:
            totals.setdefault((p, s), []).append(r)
    missing = sorted({p for p, s in totals if (p, 1 - s) not in totals})
    if missing:
        raise ValueError(f"mllm_grpo: the reward batch holds an image of pair(s) {missing[:5]} without its partner's "
                         "rollouts; the pair term needs whole pairs (both images and all their generations) per batch")
    share = {key: sum(values) / len(values) for key, values in totals.items()}
    return right, [r * share[(p, 1 - s)] if p >= 0 else 0.0 for r, p, s in zip(right, pair_id, side)]


def reward_functions():
    """TRL reward functions (logged as ``rewards/letter`` and ``rewards/pair``); their weights are 1 and
    ``pair_weight``. The pair reward's batch mean is the rollouts' own estimate of set accuracy."""
    def letter(completions, answer, pair_id, side, **_):
        return pair_rewards(completions, answer, pair_id, side)[0]

    def pair(completions, answer, pair_id, side, **_):
        return pair_rewards(completions, answer, pair_id, side)[1]

    return [letter, pair]


def letters_only(backend, example: dict[str, Any]) -> dict[str, Any]:
    """Generation settings that sample one token among the two eval's greedy mode compares (the first token of
    the reply ``A`` and of ``B`` as the chat template renders it): greedy mode's choice, as a policy. Every other
    token is suppressed. The loss still takes the log-probability over the whole vocabulary, but the group-centred
    advantages of one-token completions sum to zero per image, so the gradient is exactly that of the two-letter
    softmax."""
    from unconfuse.eval.models.base import Query

    content = example["prompt"][0]["content"]
    letters = backend.letter_token_ids(("A", "B"), Query("rollout", example["images"][0], content))
    vocabulary = backend.model.get_output_embeddings().weight.shape[0]
    return {"suppress_tokens": [i for i in range(vocabulary) if i not in letters]}


class PairGRPOTrainer(AnchoredToBase, GRPOTrainer):
    """GRPOTrainer whose generation batches hold whole pairs: both images of each pair, each with its
    ``num_generations`` rollouts, in the same process's slice (``PairRepeatSampler``)."""

    def __init__(self, *args, pairs_per_batch: int, replay_items: int = 0, replay_per_batch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_per_batch, self.replay_items, self.replay_per_batch = pairs_per_batch, replay_items, replay_per_batch

    def _get_train_sampler(self, dataset=None) -> PairRepeatSampler:
        dataset = self.train_dataset if dataset is None else dataset
        local = self.args.per_device_train_batch_size * self.args.steps_per_generation
        unit = (2 * self.pairs_per_batch + self.replay_per_batch) * self.num_generations  # one device batch
        if self.args.per_device_train_batch_size != unit or self.args.generation_batch_size % unit:
            raise ValueError(f"mllm_grpo: a process's generation batch of {local} completions cannot hold whole pairs "
                             f"of 2 x {self.num_generations} rollouts; per_device_train_batch_size must be "
                             f"(2 x pairs_per_batch + replay per batch) x num_generations = {unit}")
        units = self.args.generation_batch_size // unit
        return PairRepeatSampler((len(dataset) - self.replay_items) // 2, self.num_generations,
                                 units * self.pairs_per_batch, repeat_count=self.num_iterations * self.args.steps_per_generation,
                                 seed=self.args.seed, shuffle=self.shuffle_dataset, replay_items=self.replay_items,
                                 replay_per_unit=self.replay_per_batch, pairs_per_unit=self.pairs_per_batch)


def main(cfg: MllmGrpoConfig, callbacks: Sequence[Any] = ()) -> RunResults:
    """Run the recipe; returns its run record (also in ``<run>/results.json``). ``callbacks``: TrainerCallbacks
    added after the run\'s own (its validation loop, checkpoints, signals)."""
    from datasets import Dataset

    # data: run directory, pairs, leakage audit
    grpo = cfg.grpo
    run = lifecycle.open_run(RECIPE, cfg, cfg.strategy or with_replay("grpo" if grpo.pair_weight else "grpo-letter", cfg),
                             modes=[cfg.val_mode, *cfg.test_modes])
    arguments = trainer_arguments(run, cfg.train)
    arguments["per_device_train_batch_size"] = (arguments["per_device_train_batch_size"] + run.replay_per_batch) \
        * grpo.num_generations  # GRPO counts completions: (whole pairs + replay prompts) x rollouts
    letters = grpo.rollouts == "letters"
    args = GRPOConfig(**arguments, num_generations=grpo.num_generations,
                      max_completion_length=1 if letters else grpo.max_completion_length, temperature=grpo.temperature,
                      beta=grpo.beta, scale_rewards=grpo.scale_rewards,
                      reward_weights=[1.0, grpo.pair_weight])  # made before the model (ZeRO-3)

    # model + LoRA (disabling it gives the KL reference), trainer, then the base scores
    backend, spec = load_mllm(run, RECIPE)
    model = attach_lora(backend, cfg.lora, cfg.train.seed)
    warm_start(model, run.init_adapters)  # before the trainer: TRL's reference adapter copies it
    examples = [{**ex, "replay": False} for ex in rollout_prompts(run.train, run.prompts, cfg.data, cfg.train.seed)]
    replay = replay_examples(run, "grpo", run.prompts, cfg.train.seed)
    if letters:
        args.generation_kwargs = letters_only(backend, examples[0])
    trainer = PairGRPOTrainer(model=model, reward_funcs=reward_functions(), args=args,
                                   processing_class=with_eval_bos(backend.processor),
                                   train_dataset=Dataset.from_list(examples + replay), pairs_per_batch=cfg.train.pairs_per_batch,
                                   replay_items=len(replay), replay_per_batch=run.replay_per_batch,
                                   anchor_weight=cfg.lora.anchor_weight)
    if "ref" in model.peft_config and not (run.init_adapters and grpo.beta):
        # TRL copies a passed-in adapter as the KL reference: a fresh one is the base (adapters disabled), and
        # without a KL term no reference is needed; a warm start's copy is the reference of its KL term
        model.delete_adapter("ref")
    evaluate = evaluator(run, spec, backend, trainer, vision_trains=cfg.lora.vision != "none" or cfg.lora.projector != "none")
    retain = retention_evaluator(run, backend, trainer)
    base = lifecycle.score_stage(run, "base", lambda bench, mode: evaluate(bench, mode, base=True), spec.name,
                                 retain=lambda rset: retain(rset, base=True))

    def save_adapters(folder):
        model.save_pretrained(str(folder))
        backend.processor.save_pretrained(str(folder))

    callback = lifecycle.validation(run, evaluate, save_adapters, val_mode=cfg.val_mode,
                                    saved_parameters=lambda: [p for p in model.parameters() if p.requires_grad], retain=retain)
    trainer.add_callback(callback)

    # train, then test the selected adapters (loaded into the trained model in place)
    lifecycle.fit(run, trainer, callbacks)
    load_best_adapters(run, model)
    final = lifecycle.score_stage(run, "test", evaluate, spec.name, retain=retain)
    return lifecycle.finish(run, spec.name, base, final, trainer, callback, details={"grpo": to_dict(grpo)})


if __name__ == "__main__":
    sys.exit(recipe_cli(RECIPE))
