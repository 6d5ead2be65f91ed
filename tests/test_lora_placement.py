"""LoRA placement per architecture: adapters land on the real modules of each twin, full training on the
named parts, and a setting an architecture cannot take is an error that names it."""
import pytest
import torch

from unconfuse.eval.models import load_model
from unconfuse.train.config import ConfigError
from unconfuse.train.mllm import MllmLora, attach_lora, lora_placement

# twin -> (language model, projector, vision tower, linear layers of the projector, of the tower without it)
PARTS = {
    "tiny-llava": ("model.language_model", "model.multi_modal_projector", "model.vision_tower", 2, 12),
    "tiny-qwen2-vl": ("model.language_model", "model.visual.merger", "model.visual", 2, 8),
    # gated vision MLPs (gate/up/down_proj) adapted too; the merger's mlp.1 is a GELU, not adapted
    "tiny-qwen2.5-vl": ("model.language_model", "model.visual.merger", "model.visual", 2, 20),
    # CLIP tower as LLaVA's; image_newline (a raw parameter beside them) is neither part: see test below
    "tiny-llava-next": ("model.language_model", "model.multi_modal_projector", "model.vision_tower", 2, 12),
    "tiny-llava-med": ("model.language_model", "model.multi_modal_projector", "model.vision_tower", 2, 12),  # as converted
}


def linears(model, prefix: str, exclude: str | None = None) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")
            and not (exclude and n.startswith(exclude + "."))]


@pytest.mark.parametrize("twin", PARTS)
def test_adapters_and_full_training_land_on_each_part(twin):
    lm, projector, vision, n_projector, n_vision = PARTS[twin]
    backend, _ = load_model(twin, device="cpu")
    model = backend.model
    assert len(linears(model, projector)) == n_projector
    assert len(linears(model, vision, exclude=projector)) == n_vision
    lm_layers = [n for n in linears(model, lm) if n.rpartition(".")[2].endswith("_proj")]
    expected = {"language model": lm_layers, "projector": linears(model, projector),
                "vision": linears(model, vision, exclude=projector)}
    placement = lora_placement(model, MllmLora(projector="lora", vision="lora"))
    assert placement.lora == expected and placement.full == []
    peft_model = attach_lora(backend, MllmLora(projector="lora", vision="lora"), seed=0)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for n, m in peft_model.named_modules() if n.endswith(".lora_A.default")}
    assert adapted == {name for names in expected.values() for name in names}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("twin", PARTS)
def test_full_parts_train_every_parameter_of_the_part(twin):
    lm, projector, vision, _, _ = PARTS[twin]
    backend, _ = load_model(twin, device="cpu")
    peft_model = attach_lora(backend, MllmLora(projector="full", vision="full"), seed=0)
    params = dict(peft_model.named_parameters())
    tower = [n for n in params if f".{vision}." in n and ".modules_to_save." in n]
    assert tower and all(params[n].requires_grad for n in tower)
    # the projector trains in full too: beside the tower (LLaVA) or as part of it (Qwen's visual.merger)
    projector_params = [n for n in params if f".{projector.rpartition('.')[2]}." in n and ".modules_to_save." in n]
    assert projector_params and all(params[n].requires_grad for n in projector_params)
    frozen_lm = [n for n in params if f".{lm}." in n and "lora_" not in n]
    assert frozen_lm and not any(params[n].requires_grad for n in frozen_lm)


def test_gemma3_projector_takes_full_training_but_not_lora():
    backend, _ = load_model("tiny-gemma3", device="cpu")
    with pytest.raises(ConfigError, match=r"lora.projector: lora cannot apply to gemma3: model.multi_modal_projector "
                                          r"has no linear layer"):
        lora_placement(backend.model, MllmLora(projector="lora"))
    placement = lora_placement(backend.model, MllmLora(projector="full", vision="lora"))
    assert placement.full == ["model.multi_modal_projector"] and len(placement.lora["vision"]) == 12
    assert len(placement.lora["language model"]) == 14  # 2 layers x q, k, v, o, gate, up, down


def test_settings_an_architecture_cannot_take_are_errors():
    backend, _ = load_model("tiny-qwen2-vl", device="cpu")
    with pytest.raises(ConfigError, match=r"lora.vision: full also trains qwen2_vl's projector \(model.visual.merger"):
        lora_placement(backend.model, MllmLora(projector="none", vision="full"))
    assert lora_placement(backend.model, MllmLora(projector="full", vision="full")).full == ["model.visual"]

    class NoProjector(torch.nn.Module):  # a language model alone: no projector to adapt
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "text-only"})()
            self.language_model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)})

    with pytest.raises(ConfigError, match="lora.projector: lora: text-only has no projector module"):
        lora_placement(NoProjector(), MllmLora(projector="lora"))
    with pytest.raises(ConfigError, match="lora.vision: full: text-only has no vision module"):
        lora_placement(NoProjector(), MllmLora(vision="full"))


def test_llava_next_image_newline_stays_with_the_frozen_language_model():
    """LLaVA-NeXT's image_newline (the learned embedding that ends each row of image features) is a raw
    parameter beside the projector and the tower, in the language model's input space. LLaVA-NeXT's own
    training unfreezes it with the language model (mm_language_model), not with the projector (mm_mlp_adapter);
    here the language model trains through LoRA only, so it stays frozen whatever the projector and tower do
    (peft's modules_to_save takes modules, so a trained raw parameter would not be saved either)."""
    backend, _ = load_model("tiny-llava-next", device="cpu")
    settings = MllmLora(projector="full", vision="full")
    assert lora_placement(backend.model, settings).full == ["model.multi_modal_projector", "model.vision_tower"]
    peft_model = attach_lora(backend, settings, seed=0)
    newline = {n: p for n, p in peft_model.named_parameters() if "image_newline" in n}
    assert list(newline) == ["base_model.model.model.image_newline"]
    assert not any(p.requires_grad for p in newline.values())


@pytest.mark.parametrize("lm, names", [("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                       ("mlp", {"gate_proj", "up_proj", "down_proj"})])
@pytest.mark.parametrize("twin", ["tiny-llava", "tiny-qwen2.5-vl", "tiny-gemma3"])
def test_lora_lm_places_adapters_on_the_attention_or_the_mlp_only(twin, lm, names):
    backend, _ = load_model(twin, device="cpu")
    everything = lora_placement(backend.model, MllmLora()).lora["language model"]
    chosen = lora_placement(backend.model, MllmLora(lm=lm)).lora["language model"]
    assert chosen and {n.rpartition(".")[2] for n in chosen} == names
    assert set(chosen) == {n for n in everything if n.rpartition(".")[2] in names}
