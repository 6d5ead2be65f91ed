"""The mitigation recipes: one file each, read top to bottom (data -> model -> trainer -> train).

Adding a recipe: write ``recipes/<name>.py`` (a ``CONFIG_CLASS`` dataclass and ``main(cfg) ->
RunResults`` that calls the shared steps of ``unconfuse.train.run``), add its name to ``RECIPES``,
and put its configs in ``configs/<name>/``. The CLI (``unconfuse train``/``cv``), the demo, the
config test and ``unconfuse compare`` pick it up from here.
"""
from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = (
    "clip_hardneg",  # contrastive fine-tuning of a CLIP-style encoder, confusing pairs as hard negatives
    "mllm_sft",  # LoRA SFT of an MLLM on the pair questions (TRL SFTTrainer)
    "mllm_dpo",  # preference tuning of an MLLM with the pair image-contrast term (TRL DPOTrainer)
    "mllm_grpo",  # RL of an MLLM with a reward for the set-accuracy event (TRL GRPOTrainer)
)


def recipe_module(name: str) -> ModuleType:
    """The module of recipe ``name`` (imported on demand: recipes pull in torch and transformers)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return importlib.import_module(f"unconfuse.recipes.{name}")
