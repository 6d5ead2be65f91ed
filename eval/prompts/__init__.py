"""Versioned prompt sets (data files beside this module)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PROMPT_DIR = Path(__file__).parent
DEFAULT_PROMPTS = "mediconfusion-v1"
MODES = ("mc", "greedy", "prefix", "freeform", "clip")


@dataclass(frozen=True)
class PromptSet:
    version: str
    data: dict[str, Any]

    def template(self, mode: str, key: str | None = None) -> str:
        """The template of ``mode`` for prompt key ``key`` (falls back to ``default``)."""
        table = self.data.get(mode)
        if not isinstance(table, dict) or "default" not in table:
            raise KeyError(f"prompt set {self.version} has no {mode!r} prompts")
        return table.get(key or "default", table["default"])

    def render(self, mode: str, question: str, options: tuple[str, str], key: str | None = None, **extra: str) -> str:
        return self.template(mode, key).format(question=question, option_a=options[0], option_b=options[1], **extra)

    @property
    def judge(self) -> dict[str, Any]:
        return self.data["judge"]


@lru_cache(maxsize=None)
def load_prompts(name_or_path: str = DEFAULT_PROMPTS) -> PromptSet:
    """A prompt set by version name (a file in this folder) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.exists():
        path = PROMPT_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in PROMPT_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"prompt set {name_or_path!r} not found (known: {known})")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if "version" not in data:
        raise ValueError(f"{path}: prompt set needs a `version`")
    return PromptSet(version=str(data["version"]), data=data)
