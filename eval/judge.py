"""The freeform judge: any OpenAI-compatible chat endpoint scores how close a free answer is to
each option (1-10), with the reference judging prompt; the option ahead by at least ``tr`` wins.

API keys come from the environment only (``UNCONFUSE_JUDGE_API_KEY``, else ``OPENAI_API_KEY``)
and are never written anywhere.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .http import http_session
from .prompts import PromptSet

API_KEY_VARIABLES = ("UNCONFUSE_JUDGE_API_KEY", "OPENAI_API_KEY")
_SCORE = {letter: re.compile(rf"^\W*{letter}\W*:\s*\**\s*(\d+(?:\.\d+)?)", re.M) for letter in "AB"}


class JudgeError(RuntimeError):
    pass


def parse_judge_scores(text: str | None) -> dict[str, float] | None:
    """``A: 8\\nB: 2\\nYour explanation: ...`` -> {"A": 8.0, "B": 2.0}; None when a score is missing."""
    if not text:
        return None
    scores = {}
    for letter, pattern in _SCORE.items():
        match = pattern.search(text)
        if not match:
            return None
        scores[letter] = float(match.group(1))
    return scores


def decide(scores: dict[str, float] | None, tr: float = 3) -> str | None:
    """The reference rule: an option wins when its score is at least ``tr`` above the other's."""
    if scores is None:
        return None
    if scores["A"] >= scores["B"] + tr:
        return "A"
    if scores["B"] >= scores["A"] + tr:
        return "B"
    return None


def chat_endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def chat_completion(endpoint: str, body: dict[str, Any], timeout: float = 60.0, retries: int = 4) -> str:
    """POST an OpenAI-style chat completion and return the reply text; retries with backoff on 5xx,
    429 and broken connections (``http_session``). The API key comes from the environment and is
    only sent."""
    import requests

    headers = {"Content-Type": "application/json"}
    for var in API_KEY_VARIABLES:
        if os.environ.get(var):
            headers["Authorization"] = f"Bearer {os.environ[var]}"
            break
    with http_session(retries, backoff=1.0) as session:
        try:
            reply = session.post(endpoint, json=body, headers=headers, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError) as exc:
            raise JudgeError(f"{endpoint} unreachable: {exc}") from exc
    if reply.status_code >= 400:
        raise JudgeError(f"{endpoint} answered HTTP {reply.status_code}: {reply.text[:200]}")
    return reply.json()["choices"][0]["message"]["content"]


@dataclass
class Judge:
    url: str
    model: str
    prompts: PromptSet
    temperature: float = 0.0
    timeout: float = 60.0
    retries: int = 4

    @property
    def endpoint(self) -> str:
        return chat_endpoint(self.url)

    def message(self, question: str, options: tuple[str, str], response: str) -> str:
        cfg = self.prompts.judge
        return cfg["template"].format(question=question, option_a=options[0], option_b=options[1],
                                      response=response, role=cfg["role"], instruct=cfg["instruct"])

    def ask(self, question: str, options: tuple[str, str], response: str) -> str:
        """The judge's raw reply (retries with backoff on 5xx, 429 and broken connections)."""
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": self.temperature,
            "messages": [{"role": "system", "content": self.prompts.judge["system"]},
                         {"role": "user", "content": self.message(question, options, response)}],
        }
        return chat_completion(self.endpoint, body, timeout=self.timeout, retries=self.retries)
