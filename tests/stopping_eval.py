"""``unconfuse eval`` whose process ``UNCONFUSE_TEST_STOP_RANK`` dies like a killed job: it answers one
batch, then starts writing the next and exits mid-line. Run it in every process of a launch:
``unconfuse.eval.launch.accelerate_launch("tests.stopping_eval", ACCEL, ["eval", ...])``."""
from __future__ import annotations

import os
import sys

from unconfuse.cli.eval import main
from unconfuse.eval import runner

STOP_RANK_ENV = "UNCONFUSE_TEST_STOP_RANK"


def stop_after_one_batch() -> None:
    real = runner.answer_pairs
    calls = {"n": 0}

    def answer_pairs(backend, spec, cfg, prompts, bench, pairs, judge=None):
        if calls["n"] == 1 and os.environ.get("RANK") == os.environ.get(STOP_RANK_ENV):
            from pathlib import Path

            with open(runner.part_path(Path(cfg.out), int(os.environ["RANK"])), "a") as fh:
                fh.write('{"pair_id": "torn by the kill", "ima')
            os._exit(9)
        calls["n"] += 1
        return real(backend, spec, cfg, prompts, bench, pairs, judge)

    runner.answer_pairs = answer_pairs


if __name__ == "__main__":
    stop_after_one_batch()
    sys.exit(main())
