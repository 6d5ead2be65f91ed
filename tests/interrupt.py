"""Stop a training run in the middle, as a killed job would, and compare what a resumed run wrote, for resume tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerCallback


class KilledAfterStep(TrainerCallback):
    """Passed to a recipe's ``main(cfg, callbacks=[...])``: training raises KeyboardInterrupt right after ``step``
    (its validation done), as a killed job stops; the caller expects that interrupt."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def assert_same_answers(got: Path, want: Path) -> None:
    """The same questions in the same order with the same answers; scores equal up to the float noise of
    encoding an image (or text) in another batch, which a resumed run (or another process) does for what its
    cache lost: on some CPUs a matmul's last bits depend on the batch it is in."""
    got_records, want_records = ([json.loads(line) for line in path.read_text().splitlines()] for path in (got, want))
    assert [(r["pair_id"], r["image"], r["answer"]) for r in got_records] == \
        [(r["pair_id"], r["image"], r["answer"]) for r in want_records]
    for g, w in zip(got_records, want_records):
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-5)
