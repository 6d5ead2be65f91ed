"""Tiny twins of the encoder presets (random weights, built offline with the real classes and config formats):
BiomedCLIP (open_clip: timm ViT + Hugging Face BERT), PMC-CLIP (open_clip's ViT-L/14 shape), SigLIP
(transformers), and CLIP in open_clip and transformers. Eval loads each as it loads the real one, images move
the clip scores, batching changes nothing, LoRA lands on every linear layer of the vision tower, and
clip_hardneg trains each (lora, locked_text) into a checkpoint that eval loads back."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.twin_inputs import blocky_image, question_rows
from unconfuse.eval.models import Query, load_model
from unconfuse.eval.prompts import load_prompts
from unconfuse.eval.world import prepare
from unconfuse.recipes import run_recipe
from unconfuse.recipes.clip_hardneg import hf_clip_encoder, lora_targets, open_clip_encoder

REPO = Path(__file__).resolve().parents[1]
# recipe runs: BiomedCLIP's in the fast lane, the others slow (the last two also train in test_clip_hardneg.py)
TWINS = ["tiny-biomedclip", "tiny-pmc-clip", "tiny-siglip", "tiny-clip", "tiny-hf-clip"]
PARITY = 1e-5  # batched vs one query at a time (measured: <= 1e-7 on CPU float32)
SWAP = 5e-3  # what swapping the image must move a score by, at least (measured: 0.035 to 0.22)


def _blocks(prefix: str, n: int, modules: tuple[str, ...]) -> set[str]:
    return {f"{prefix}.{i}.{m}" for i in range(n) for m in modules}


HF_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
OPEN_CLIP_BLOCK = ("attn", "mlp.c_fc", "mlp.c_proj")  # attn: nn.MultiheadAttention (q, k, v in in_proj_weight)
LORA_TARGETS = {  # the vision tower's linear layers and attention blocks, exactly
    # timm ViT (6 blocks of test_vit) and open_clip's linear head on it
    "tiny-biomedclip": _blocks("visual.trunk.blocks", 6, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
                       | {"visual.head.proj"},
    "tiny-pmc-clip": _blocks("visual.transformer.resblocks", 2, OPEN_CLIP_BLOCK),
    "tiny-clip": _blocks("visual.transformer.resblocks", 2, OPEN_CLIP_BLOCK),
    # SigLIP's attention-pooling head: an nn.MultiheadAttention and an MLP
    "tiny-siglip": _blocks("vision_model.encoder.layers", 2, HF_LAYER)
                   | {"vision_model.head.attention", "vision_model.head.mlp.fc1", "vision_model.head.mlp.fc2"},
    "tiny-hf-clip": _blocks("vision_model.encoder.layers", 2, HF_LAYER),
}


def _adapted_weights(name: str) -> set[str]:
    """The state-dict entries LoRA merges into: an attention block's in_proj_weight and out_proj.weight, else .weight."""
    weights = set()
    for module in LORA_TARGETS[name]:
        if module.endswith(("attn", "attention")):
            weights |= {f"{module}.in_proj_weight", f"{module}.out_proj.weight"}
        else:
            weights.add(f"{module}.weight")
    return weights


def _is_vision(key: str) -> bool:
    return key.startswith(("visual.", "vision_model.", "visual_projection"))


@pytest.fixture(scope="module", params=TWINS)
def twin(request):
    prepare(models=[request.param])
    backend, spec = load_model(request.param, device="cpu")
    assert spec.is_encoder
    return request.param, backend, spec


def _queries(swap=False):
    """As eval's runner builds clip queries: two images of different sizes, two questions on the first."""
    template = load_prompts().template("clip", "default")
    queries = [Query(key, image, question, options, {"pair_id": f"p{i}", "image": 1})
               for i, (key, image, question, options) in enumerate(question_rows(swap, block=8))]
    return queries, [tuple(template.format(question=q.prompt, option=o) for o in q.options) for q in queries]


def test_twin_images_move_the_scores_and_batching_changes_nothing(twin):
    name, backend, _ = twin
    backend.clear_cache()
    queries, texts = _queries()
    together = backend.similarities(queries, texts)
    alone = []
    for query, row in zip(queries, texts):
        backend.clear_cache()
        alone += backend.similarities([query], [row])
    assert np.allclose(together, alone, atol=PARITY, rtol=0)
    backend.clear_cache()
    swapped = backend.similarities(*_queries(swap=True))
    moved = np.abs(np.array(swapped) - np.array(together))
    assert moved.max() >= SWAP, (name, moved)
    # and the options' order can change with the image: the margin between them moves too
    margins = lambda scores: np.array(scores)[:, 0] - np.array(scores)[:, 1]
    assert np.abs(margins(swapped) - margins(together)).max() >= SWAP / 5, name  # measured: 0.012 to 0.33


def test_lora_targets_are_the_vision_towers_linear_layers(twin):
    name, backend, spec = twin
    encoder = (open_clip_encoder if spec.family == "open-clip" else hf_clip_encoder)(backend, spec)
    assert sorted(lora_targets(encoder, None)) == sorted(LORA_TARGETS[name])


def test_biomedclip_twin_has_biomedclips_format_and_loads_in_plain_open_clip():
    import open_clip
    from transformers import BertModel

    from unconfuse.eval.home import built_model_dir

    prepare(models=["tiny-biomedclip"])
    folder = built_model_dir("tiny-biomedclip")
    config = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    # the keys of hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's open_clip_config.json
    assert set(config["vision_cfg"]) == {"timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "image_size"}
    assert set(config["text_cfg"]) == {"hf_model_name", "hf_tokenizer_name", "hf_proj_type", "hf_pooler_type", "context_length"}
    assert config["text_cfg"]["hf_model_name"] == str(folder / "bert")  # the final folder, not the one it was built in
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert type(model).__name__ == "CustomTextCLIP" and type(model.visual).__name__ == "TimmModel"
    assert isinstance(model.text.transformer, BertModel) and type(model.visual.trunk).__name__ == "VisionTransformer"
    ids = tokenizer(["Which side?"])[0].tolist()
    cls, sep = tokenizer.tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    assert len(ids) == 64 and ids[0] == cls and ids[ids.index(sep) + 1:] == [0] * (63 - ids.index(sep))
    assert preprocess(blocky_image(112, 84, 0, block=8)).shape == (3, 64, 64)


def test_pmc_clip_twin_has_vit_l_14s_config_keys():
    import open_clip

    from unconfuse.eval.home import built_model_dir

    prepare(models=["tiny-pmc-clip"])
    config = json.loads((built_model_dir("tiny-pmc-clip") / "open_clip_config.json").read_text())["model_cfg"]
    real = open_clip.get_model_config("ViT-L-14")
    assert set(config) == set(real) and all(set(config[k]) == set(real[k]) for k in ("vision_cfg", "text_cfg"))
    assert config["vision_cfg"]["patch_size"] == 14 and config["text_cfg"]["context_length"] == 77


def test_siglip_twin_has_the_real_processor_classes():
    prepare(models=["tiny-siglip"])
    backend, _ = load_model("tiny-siglip", device="cpu")
    processor = backend.processor
    assert [type(x).__name__ for x in (backend.model, processor, processor.tokenizer, processor.image_processor)] == [
        "SiglipModel", "SiglipProcessor", "SiglipTokenizer", "SiglipImageProcessor"]
    ids = processor(text=["Left.", "Which side is the lesion on?"], padding=backend.text_padding,
                    return_tensors="pt")["input_ids"]
    assert ids.shape == (2, 64) and (ids[:, -1] == processor.tokenizer.pad_token_id).all()


@pytest.fixture(scope="module")
def world(world_of):
    return world_of(16)


@pytest.mark.parametrize("trainable", ["lora", "locked_text"])
@pytest.mark.parametrize("name", [TWINS[0], *(pytest.param(name, marks=pytest.mark.slow) for name in TWINS[1:])])
def test_clip_hardneg_trains_every_twin(name, trainable, world, tmp_path):
    """Two steps; the best checkpoint (step 2) holds exactly the trained change and loads as `unconfuse eval` loads it."""
    out = tmp_path / "run"
    results = run_recipe("clip_hardneg", str(REPO / "configs" / "clip_hardneg" / "tiny.yaml"), [
        f"model={name}", f"trainable={trainable}", f"output_dir={out}", "report_to=none", "train.max_steps=2",
        "train.eval_steps=2", "train.save_steps=2", "train.logging_steps=1", "train.pairs_per_batch=2",
        "train.warmup_steps=0", "train.learning_rate=0.001", "train.selection=last", *(f"data.{s}={world.root / s}" for s in ("train", "val", "test"))])
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert results.steps == 2 and results.best_step == 2 and len(losses) == 2
    assert losses[0] != losses[1] and all(0.1 < loss < 10 for loss in losses), losses

    base, base_spec = load_model(name, device="cpu")
    best, spec = load_model(str(out / "checkpoints" / "best"), device="cpu")  # what `unconfuse eval --model DIR` does
    assert spec.family == base_spec.family and type(best.model) is type(base.model)
    before, after = base.model.state_dict(), best.model.state_dict()
    assert set(after) == set(before)  # the model's own names: LoRA merged away
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if trainable == "lora":
        assert changed == _adapted_weights(name)
    else:
        text = {k for k in before if not _is_vision(k) and "logit" not in k}
        assert text and not changed & text  # the text tower, its projection included, is bitwise unchanged
        assert _adapted_weights(name) <= changed  # every linear layer of the vision tower trained
    assert results.final["n_pairs"] == 4  # the recipe scored the test pairs with this checkpoint
    queries, texts = _queries()
    trained, untrained = np.array(best.similarities(queries, texts)), np.array(base.similarities(queries, texts))
    assert np.isfinite(trained).all() and np.abs(trained - untrained).max() > 1e-5
