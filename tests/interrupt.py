"""Stop a training run in the middle, as a killed job would, for resume tests."""
from __future__ import annotations

from contextlib import contextmanager

import pytest

from unconfuse.train.callbacks import PairValidationCallback


@contextmanager
def killed_at_step(monkeypatch, step: int):
    """Inside the block, training raises KeyboardInterrupt right after ``step`` (its validation
    and checkpoint done); the block expects that interrupt."""
    original = PairValidationCallback.on_step_end

    def on_step_end(self, args, state, control, **kw):
        result = original(self, args, state, control, **kw)
        if state.global_step == step:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(PairValidationCallback, "on_step_end", on_step_end)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(PairValidationCallback, "on_step_end", original)
