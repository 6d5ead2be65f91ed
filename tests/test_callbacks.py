"""The validation callback's selection rule, early stopping and persistence, on a scripted evaluator."""
import json
from types import SimpleNamespace

from unconfuse.train.callbacks import PairValidationCallback


def _scripted(values):
    rows = iter(values)
    return lambda: dict(zip(("set_accuracy", "confusion"), next(rows)), individual_accuracy=50.0, invalid=0.0)


def test_selection_ties_early_stopping_and_resume(tmp_path):
    saved = []
    # (set accuracy, confusion) at steps 0, 10, 20, 30, 40
    cb = PairValidationCallback(tmp_path, _scripted([(10, 90), (20, 80), (20, 70), (15, 60), (20, 75)]),
                                saved.append, eval_steps=10, patience=2)
    control = SimpleNamespace(should_training_stop=False)
    cb.on_train_begin(None, SimpleNamespace(global_step=0), control)
    for step in (5, 10, 20, 30, 40):
        cb.on_step_end(None, SimpleNamespace(global_step=step, max_steps=100), control)
    assert saved == [0, 10, 20]  # step 20 ties on set accuracy and wins on lower confusion
    assert cb.state.best_step == 20 and control.should_training_stop  # 30 and 40 did not improve
    history = [json.loads(line) for line in (tmp_path / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 10, 20, 30, 40]
    # a resumed run reloads the state and does not evaluate a step twice
    again = PairValidationCallback(tmp_path, _scripted([]), saved.append, eval_steps=10, patience=2)
    again.on_step_end(None, SimpleNamespace(global_step=20, max_steps=100), control)
    assert again.state.best_step == 20 and len(again.state.history) == 5
