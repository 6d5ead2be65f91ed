"""Training-free strategies (``unconfuse eval --strategy``): vcd, describe, retrieve on the LLaVA-1.5, Qwen2.5-VL and
Gemma 3 twins, their records, fingerprints, retention, compare and refusals."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from unconfuse.cli import main
from unconfuse.eval import evaluate, load_benchmark, load_model
from unconfuse.eval.images import load_image
from unconfuse.eval.models import Query, Reference
from unconfuse.eval.scorer import choose_letter
from unconfuse.eval.strategies import (ContrastiveDecoding, DiffusionNoise, StrategyError, VisualContrast,
                                       audit_corpus, contrast, corpus_items, parse_strategy)

# LLaVA-1.5 in the fast lane; Qwen2.5-VL, Gemma 3 (MedGemma) and LLaVA-NeXT (tiles per image) in the full suite
TWINS = ["tiny-llava", *(pytest.param(twin, marks=pytest.mark.slow)
                         for twin in ("tiny-qwen2.5-vl", "tiny-gemma3", "tiny-llava-next"))]
PAIRS = 3


@pytest.fixture(scope="module", params=TWINS)
def twin(request):
    return load_model(request.param, device="cpu")


@pytest.fixture(scope="module")
def test_bench(world):
    return load_benchmark(str(world.root / "test")).limit(PAIRS)


def _scores(records):
    return [[r["scores"]["A"], r["scores"]["B"]] for r in records]


# -- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, message", [
    ("beam", [], "--strategy 'beam': unknown; strategies: plain, vcd, describe, retrieve"),
    ("vcd", ["beta=0.1"], "strategy vcd has no option 'beta' (its options: alpha, cutoff, noise_step, seed)"),
    ("vcd", ["alpha"], "--strategy-option 'alpha': key=value is needed"),
    ("vcd", ["alpha=strong"], "alpha needs a number"),
    ("vcd", ["alpha=-1"], "alpha must be at least 0.0"),
    ("vcd", ["noise_step=1000"], "noise_step must be between 0 and 999"),
    ("vcd", ["alpha=nan"], "alpha must be a finite number"),
    ("retrieve", [], "--strategy retrieve needs --strategy-option corpus=..."),
    ("plain", ["alpha=1"], "strategy plain has no option 'alpha' (its options: none)"),
])
def test_bad_strategies_and_options_are_named(name, options, message):
    with pytest.raises(StrategyError, match=None) as err:
        parse_strategy(name, options)
    assert message in str(err.value)


def test_options_fill_defaults_and_label_what_differs():
    vcd = parse_strategy("vcd", ["alpha=0.5", "seed=3"])
    assert vcd.options == {"alpha": 0.5, "cutoff": 0.1, "noise_step": 500, "seed": 3}
    assert vcd.label() == "vcd alpha=0.5" and vcd.seed == 3  # seeds group in compare, they do not name
    assert parse_strategy("describe").record() == {"name": "describe", "options": {"max_new_tokens": 64},
                                                   "prompts": "strategies-v1"}


def test_a_minus_infinite_score_loses_and_nan_is_no_answer():
    assert choose_letter([-math.inf, -3.0]) == 1 and choose_letter([-3.0, -math.inf]) == 0
    assert choose_letter([-math.inf, -math.inf]) is None and choose_letter([math.nan, 0.0]) is None
    assert choose_letter([0.0, math.inf]) is None
    assert choose_letter([1.0, 1.0]) == 0 and choose_letter([1.0, 1.0], first_wins_ties=False) == 1


# -- vcd -----------------------------------------------------------------------------------------

def test_diffusion_noise_is_vcds_schedule_and_fixed_by_the_pixels_and_seed():
    x = torch.linspace(-1, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)
    noisy = DiffusionNoise(500, 0)(x)
    assert torch.equal(noisy, DiffusionNoise(500, 0)(x.clone()))  # the same image: the same noise, in any batch
    assert not torch.equal(noisy, DiffusionNoise(500, 1)(x))
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    keep = float(torch.cumprod(1 - betas, 0)[500])  # VCD's alphas_bar at t=500: 0.745 (sqrt: 0.86 of the image)
    assert 0.74 < keep < 0.75
    noise = (noisy - math.sqrt(keep) * x) / math.sqrt(1 - keep)
    assert abs(float(noise.mean())) < 0.2 and 0.8 < float(noise.std()) < 1.2  # what is added is unit Gaussian
    assert float((DiffusionNoise(0, 0)(x) - x).std()) < 0.01  # step 0: almost the image; step 999: almost noise
    assert float((DiffusionNoise(999, 0)(x) - math.sqrt(0.0812) * x).std()) > 0.9


def test_visual_contrast_gives_both_rows_the_contrast_of_the_clean_row():
    clean, noisy = torch.tensor([[2.0, 1.0, -3.0]]), torch.tensor([[3.0, 0.0, -3.0]])
    out = VisualContrast(1, alpha=1.0, cutoff=0.1)(None, torch.cat([clean, noisy]))
    lc, ln = torch.log_softmax(clean, -1), torch.log_softmax(noisy, -1)
    expected = 2 * lc - ln
    assert torch.equal(out[0], out[1])  # the distorted row follows the clean row's token
    assert torch.allclose(out[0, :2], expected[0, :2])
    assert out[0, 2] == -math.inf  # p = e^-5 of the best: below the 0.1 plausibility cutoff
    assert int(out[0].argmax()) == 1  # the token the distorted image also predicts loses to the one only the image supports


@pytest.mark.parametrize("mode", ["greedy", "prefix", "mc"])
def test_vcd_with_alpha_0_is_plain_scoring_exactly(twin, test_bench, mode):
    plain = evaluate(twin, test_bench, mode)
    zero = evaluate(twin, test_bench, mode, strategy=parse_strategy("vcd", ["alpha=0"]))
    assert zero.records == plain.records and zero.scores == plain.scores


@pytest.mark.parametrize("mode", ["greedy", "prefix"])
def test_vcd_moves_each_score_toward_the_undistorted_image(twin, test_bench, mode):
    plain = evaluate(twin, test_bench, mode)
    vcd = evaluate(twin, test_bench, mode, strategy=parse_strategy("vcd", ["alpha=1", "cutoff=0"]))
    moved = 0.0
    for p, v in zip(plain.records, vcd.records):
        seen = v["strategy"]
        # the clean half of the doubled batch is plain scoring (to batching noise)
        np.testing.assert_allclose(seen["plain_scores"], [p["scores"]["A"], p["scores"]["B"]], atol=1e-4)
        for letter, clean, distorted in zip("AB", seen["plain_scores"], seen["distorted_scores"]):
            # (1 + a) log p(x) - a log p(x'): away from the distorted image's score, by a times the gap
            assert v["scores"][letter] - clean == pytest.approx(clean - distorted, abs=1e-5)
            moved = max(moved, abs(clean - distorted))
    assert moved > 1e-4  # teeth: the noised image changes what the twin scores


def test_vcd_plausibility_cutoff_keeps_the_plain_models_choice_among_implausible_options(twin, test_bench):
    plain = evaluate(twin, test_bench, "greedy")
    strict = evaluate(twin, test_bench, "greedy", strategy=parse_strategy("vcd", ["alpha=3", "cutoff=1"]))
    for p, s in zip(plain.records, strict.records):  # cutoff 1: only the plain best option is plausible
        assert s["answer"] == p["answer"] and -math.inf in s["scores"].values()


def test_vcd_decodes_mc_answers_under_the_contrast(twin, test_bench):
    result = evaluate(twin, test_bench, "mc", strategy=parse_strategy("vcd", ["alpha=1"]))
    assert len(result.records) == 2 * PAIRS and all(isinstance(r["raw"], str) for r in result.records)
    # the batched decode equals a naive one: at each token, one full forward on the image and one on its noised copy,
    # contrasted, the best token appended
    backend = twin[0]
    image = test_bench.resolve_image(test_bench.pairs[0].image_1)
    query = Query(str(image), load_image(image), "Describe the image.")
    noised = Query(str(image) + "#noised", query.image, query.prompt, distort=DiffusionNoise(500, 0))
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(4):
            step = contrast(backend._plain_logprobs(query, tokens)[-1], backend._plain_logprobs(noised, tokens)[-1],
                            1.0, 0.1)
            tokens.append(int(step.argmax()))
    decoded = ContrastiveDecoding(backend, 1.0, 0.1, 500, 0).generate([query], 4)[0]
    eos = backend.model.generation_config.eos_token_id  # one id or several (Qwen: <|im_end|>, <|endoftext|>)
    eos = {backend.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    ended = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    expected = tokens[:ended]
    assert decoded == backend.tokenizer.decode(expected, skip_special_tokens=True)


# -- describe ------------------------------------------------------------------------------------

def test_describe_records_both_passes_and_answers_from_the_second(twin, test_bench):
    backend = twin[0]
    result = evaluate(twin, test_bench, "greedy", strategy=parse_strategy("describe", ["max_new_tokens=6"]))
    first = result.records[0]
    describe, answer = first["strategy"]["passes"]
    assert describe["pass"] == "describe" and answer["pass"] == "answer"
    assert answer["prompt"].startswith(f"A description of the image: {describe['reply']}\n\n")
    assert answer["prompt"].endswith("Answer: ")  # the greedy prompt follows the description
    image = test_bench.resolve_image(test_bench.pairs[0].image_1)
    img = load_image(image)
    key = str(image)
    reply = backend.generate([Query(key, img, describe["prompt"])], 6)[0].strip()
    assert describe["reply"] == reply  # the first pass is the model's own greedy description
    scores = backend.next_token_scores([Query(key + "#direct", img, answer["prompt"])], ("A", "B"))[0]
    np.testing.assert_allclose([first["scores"]["A"], first["scores"]["B"]], scores, atol=1e-4)


# -- retrieve ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(world, tmp_path_factory):
    """Four of the world's corpus records (renders of train images) with their captions."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = [json.loads(line) for line in (world.root / "corpus.jsonl").read_text().splitlines()][:4]
    for row in rows:
        shutil.copy(world.root / row["image"], folder / row["image"].split("/")[-1])
        row["image"] = row["image"].split("/")[-1]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "corpus.jsonl"


def test_retrieve_puts_the_k_nearest_corpus_images_in_the_prompt(twin, test_bench, corpus):
    strategy = parse_strategy("retrieve", [f"corpus={corpus}", "k=2", "encoder=tiny-clip"])
    result = evaluate(twin, test_bench, "greedy", strategy=strategy)
    encoder, _ = load_model("tiny-clip", device="cpu")
    items = corpus_items(str(corpus))
    corpus_emb = encoder.encode_images([load_image(i.path) for i in items]).numpy()
    for rec in result.records[:2]:
        pair = next(p for p in test_bench.pairs if p.id == rec["pair_id"])
        query = encoder.encode_images([load_image(test_bench.resolve_image(pair.image(rec["image"])))]).numpy()[0]
        nearest = np.argsort(-(corpus_emb @ query), kind="stable")[:2]
        refs = rec["strategy"]["references"]
        assert [r["image"] for r in refs] == [str(items[i].path) for i in nearest]
        assert [r["caption"] for r in refs] == [items[i].caption for i in nearest]
        assert refs[0]["similarity"] >= refs[1]["similarity"]
    # the prompt holds k + 1 images: the references before the question's own
    backend = twin[0]
    img = load_image(test_bench.resolve_image(test_bench.pairs[0].image_1))
    refs = tuple(Reference(str(i.path), load_image(i.path), f"Reference: {i.caption}\n") for i in items[:2])
    inputs = backend._inputs([Query("q", img, "Question?", references=refs)])
    n_images = len(inputs["image_grid_thw"]) if "image_grid_thw" in inputs else len(inputs["pixel_values"])
    assert n_images == 3
    # teeth: other references move the scores
    alone = backend.next_token_scores([Query("q", img, "Question?")], ("A", "B"))[0]
    with_refs = backend.next_token_scores([Query("q", img, "Question?", references=refs)], ("A", "B"))[0]
    assert max(abs(a - b) for a, b in zip(alone, with_refs)) > 1e-4


def test_a_corpus_holding_a_benchmark_image_is_refused_before_any_model_loads(world, corpus, tmp_path, capsys,
                                                                              monkeypatch):
    from unconfuse.eval import models

    leaky = tmp_path / "leaky.jsonl"
    bench = load_benchmark(str(world.root / "test"))
    copied = tmp_path / "copy.png"
    shutil.copy(bench.resolve_image(bench.pairs[1].image_2), copied)  # a copy: another path, the same bytes
    rows = [{**json.loads(line), "image": str(corpus.parent / json.loads(line)["image"])}
            for line in corpus.read_text().splitlines()]
    leaky.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"image": str(copied), "caption": "a leak"}]))
    with pytest.raises(StrategyError, match="holds 1 image"):
        audit_corpus(str(leaky), corpus_items(str(leaky)), bench)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["eval", "--model", "tiny-llava", "--mode", "greedy", "--benchmark", str(world.root / "test"),
                 "--out", str(tmp_path / "out"), "--strategy", "retrieve", "--strategy-option", f"corpus={leaky}",
                 "encoder=tiny-clip", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "retrieve corpus" in err[0] and "benchmark" in err[0]


def test_strategies_refuse_encoders_in_one_line(world, tmp_path, capsys):
    code = main(["eval", "--model", "tiny-clip", "--mode", "clip", "--benchmark", str(world.root / "test"),
                 "--out", str(tmp_path / "out"), "--strategy", "vcd", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "an encoder in clip mode has no decoding to change" in err[0]


# -- the command: fingerprint, results, retention, compare -------------------------------------

@pytest.mark.slow  # two evaluations of 30 pairs, one with retention, and a comparison (~2 s)
def test_a_strategy_is_in_the_fingerprint_results_retention_and_compare(world, tmp_path, capsys):
    common = ["--model", "tiny-llava", "--mode", "greedy", "--benchmark", str(world.root / "test"), "--quiet"]
    plain, vcd = tmp_path / "plain", tmp_path / "vcd"
    assert main(["eval", *common, "--out", str(plain)]) == 0
    assert main(["eval", *common, "--out", str(vcd), "--strategy", "vcd", "--strategy-option", "alpha=1", "seed=2",
                 "--retention", str(world.root / "retention" / "test.jsonl"), "--retention-mode", "greedy"]) == 0
    capsys.readouterr()
    results = json.loads((vcd / "results.json").read_text())
    assert results["strategy"] == "vcd" and results["seed"] == 2
    assert results["strategy_settings"] == {"name": "vcd", "options": {"alpha": 1.0, "cutoff": 0.1, "noise_step": 500,
                                                                       "seed": 2}}
    block = results["retention"]
    assert block["against"] == "the same model without the strategy" and block["mode"] == "greedy"
    before = [json.loads(line) for line in (vcd / "retention" / "before.jsonl").read_text().splitlines()]
    after = [json.loads(line) for line in (vcd / "retention" / "after.jsonl").read_text().splitlines()]
    assert len(before) == len(after) == block["metrics"]["accuracy"]["n"] > 0
    assert any(b["scores"] != a["scores"] for b, a in zip(before, after))  # the strategy answered the retention set
    fingerprint = json.loads((vcd / "fingerprint.json").read_text())
    assert fingerprint["settings"]["strategy"]["name"] == "vcd"
    assert "strategy" not in json.loads((plain / "fingerprint.json").read_text())["settings"]
    # another strategy in the same folder is another evaluation: refused
    assert main(["eval", *common, "--out", str(vcd), "--strategy", "vcd", "--strategy-option", "alpha=2"]) == 2
    assert "another" in capsys.readouterr().err
    # compare: the strategy beside the plain model, with its retention change
    assert main(["compare", str(plain), str(vcd), "--baseline", str(plain), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| vcd on tiny-llava (seed 2) |" in table and "retention" in table
    # rescoring the answers (another parser) keeps the retention block: the retention answers do not change
    assert main(["score", "--benchmark", str(world.root / "test"), "--predictions", str(vcd / "predictions.jsonl"),
                 "--parser", "reference", "--out", str(tmp_path / "rescored")]) == 0
    assert json.loads((tmp_path / "rescored" / "results.json").read_text())["retention"] == block
