"""`unconfuse convert llava-med`: a tiny checkpoint in LLaVA-Med v1.5's original layout (eval/world/tiny.py:
write_llava_med_original) converted through the command line, held to the original's pieces: every tensor where
the mapping puts it, the converted forward equal to LLaVA-Med's forward assembled by hand from those pieces, the
prompt and its tokens those of LLaVA-Med's mistral_instruct conversation, and bad input a one-line error."""
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from unconfuse.cli.commands import main
from unconfuse.eval.convert import LLAVA_MED_CHAT_TEMPLATE
from unconfuse.eval.world.tiny import write_llava_med_original

VISION = "model.vision_tower.vision_tower.vision_model."


def _convert(capsys, src, tower, out):
    code = main(["convert", "llava-med", str(src), "--vision-tower", str(tower), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-med")
    write_llava_med_original(root / "src", root / "tower")
    return root


@pytest.fixture(scope="module")
def converted(original):
    """The original converted by the command line, loaded back as eval loads it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    code = main(["convert", "llava-med", str(original / "src"), "--vision-tower", str(original / "tower"),
                 "--out", str(original / "out")])
    assert code == 0
    model = LlavaForConditionalGeneration.from_pretrained(original / "out").eval()
    return model, AutoProcessor.from_pretrained(original / "out")


def _source_tensors(src):
    tensors = {}
    for path in sorted(src.glob("model-*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            tensors |= {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors


# LLaVA-Med's mistral_instruct conversation (llava/conversation.py, SeparatorStyle.LLAMA_2 with system "", sep "",
# sep2 "</s>"), transcribed: the reference the chat template must render.
def llava_med_prompt(turns, system=""):
    out = ""
    for i, (role, message) in enumerate(turns):
        if message is None:
            continue
        if i == 0:
            message = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "") + message
        out += f"[INST] {message} [/INST]" if i % 2 == 0 else " " + message + " </s>"
    return out


def _user(text, image=True):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_every_tensor_lands_where_the_mapping_says(original, converted):
    model, processor = converted
    source = _source_tensors(original / "src")
    target = model.state_dict()
    mapping = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
               "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
               VISION: "model.vision_tower.", "model.": "model.language_model.", "lm_head.": "lm_head."}
    seen = set()
    for name, tensor in source.items():
        prefix = next(p for p in mapping if name.startswith(p))
        new = mapping[prefix] + name[len(prefix):]
        seen.add(new)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # grown by <image>, <pad> and padding rows
            assert torch.equal(target[new][:tensor.shape[0]], tensor)
            assert target[new].shape[0] % 64 == 0 and target[new].shape[0] >= len(processor.tokenizer)
        else:
            assert torch.equal(target[new], tensor), name
    assert seen == set(target)  # every converted tensor came from the source
    assert torch.equal(target["model.multi_modal_projector.linear_2.bias"], source["model.mm_projector.2.bias"])
    new_rows = target["model.language_model.embed_tokens.weight"][640:]
    old = source["model.embed_tokens.weight"]
    assert torch.isfinite(new_rows).all() and not torch.equal(new_rows[0], new_rows[1])
    assert (new_rows.mean(0) - old.mean(0)).abs().max() < 0.01  # drawn around the old rows' mean (1e-5 covariance)
    tokenizer = processor.tokenizer
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>") == 640
    assert tokenizer.pad_token == "<pad>" and model.config.text_config.pad_token_id == tokenizer.pad_token_id
    text = model.config.text_config
    assert text.model_type == "mistral" and text.rope_parameters["rope_theta"] == 1e6 and text.sliding_window is None
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-2, "default")
    assert processor.image_processor.do_pad and processor.num_additional_image_tokens == 1
    record = json.loads((original / "out" / "unconfuse_convert.json").read_text())
    assert record["vision_weights"] == "source" and "mm_vision_tower" in record["dropped_config_keys"]


def test_without_the_towers_weights_in_src_they_come_from_the_vision_tower(original, tmp_path, capsys):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    src = tmp_path / "src"
    write_llava_med_original(src, tmp_path / "tower", carry_vision=False, shards=1)
    code, _, err = _convert(capsys, src, tmp_path / "tower", tmp_path / "out")
    assert code == 0, err
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    tower = CLIPVisionModel.from_pretrained(tmp_path / "tower").state_dict()
    assert all(torch.equal(model.state_dict()["model.vision_tower." + k], v) for k, v in tower.items())
    assert json.loads((tmp_path / "out" / "unconfuse_convert.json").read_text())["vision_weights"] == "vision tower"


def _expand2square(image, color):
    """LLaVA-Med's llava/mm_utils.py expand2square (at the centre offset it draws from)."""
    width, height = image.size
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _tokenizer_image_token(prompt, sp, image_marker=-200):
    """LLaVA-Med's llava/mm_utils.py tokenizer_image_token with the SentencePiece model itself (the slow
    LlamaTokenizer it ran with): chunks around <image> encoded apart, BOS once, a marker where the image goes."""
    chunks = [[sp.bos_id()] + sp.encode(chunk) for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_marker)
        ids.extend(chunk[1:])
    return ids


@torch.no_grad()
def test_the_forward_equals_llava_med_assembled_by_hand(original, converted):
    """LLaVA-Med's forward from the original pieces: its tokens (tokenizer_image_token), its image
    (expand2square with the mean colour, the tower's CLIPImageProcessor), CLIP's second-to-last layer without
    CLS, mm_projector (Linear, GELU, Linear), the Mistral text model with the image features spliced in."""
    import sentencepiece
    from transformers import AutoImageProcessor, CLIPVisionModel, MistralConfig, MistralForCausalLM

    model, processor = converted
    src = original / "src"
    config = json.loads((src / "config.json").read_text())
    source = _source_tensors(src)
    tower = CLIPVisionModel.from_pretrained(original / "tower").eval()
    clip_processor = AutoImageProcessor.from_pretrained(original / "tower")
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    projector.load_state_dict({k[len("model.mm_projector."):]: v for k, v in source.items() if "mm_projector" in k})
    text_keys = {k for k in MistralConfig().to_dict()} | {"rope_theta"}
    language = MistralForCausalLM(MistralConfig(**{k: v for k, v in config.items() if k in text_keys})).eval()
    language.load_state_dict({k: v for k, v in source.items() if not k.startswith(("model.mm_projector", VISION))})
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))

    image = Image.fromarray((torch.rand(40, 72, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    question = "Which side is the lesion on?\nA: left\nB: right\nAnswer: "
    prompt = llava_med_prompt([("USER", "<image>\n" + question), ("ASSISTANT", None)])
    color = tuple(int(x * 255) for x in clip_processor.image_mean)
    pixels = clip_processor(_expand2square(image, color), return_tensors="pt")["pixel_values"]
    features = projector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
    ids = _tokenizer_image_token(prompt, sp)
    where = ids.index(-200)
    embed = language.get_input_embeddings()
    parts = [embed(torch.tensor(ids[:where])), features, embed(torch.tensor(ids[where + 1:]))]
    reference = language(inputs_embeds=torch.cat(parts)[None]).logits[0, -1]

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(inputs["pixel_values"], pixels)  # pad to square with the mean colour, then the tower's steps
    image_id = model.config.image_token_index
    collapsed = [t for i, t in enumerate(inputs["input_ids"][0].tolist())
                 if t != image_id or inputs["input_ids"][0][i - 1] != image_id]
    assert [(-200 if t == image_id else t) for t in collapsed] == ids  # LLaVA-Med's tokens, image run for its marker
    logits = model(**inputs).logits[0, -1, :reference.shape[0]]
    difference = (logits - reference).abs().max().item()
    assert difference < 1e-4, difference


def test_the_chat_template_renders_llava_meds_mistral_instruct(converted):
    _, processor = converted
    bos = processor.tokenizer.bos_token
    question = "Is there a fracture?"

    def render(messages, generation_prompt):
        return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    assert render([_user(question)], True) == bos + llava_med_prompt([("USER", "<image>\n" + question),
                                                                      ("ASSISTANT", None)])
    assert render([_user(question)], True) == f"<s>[INST] <image>\n{question} [/INST]"
    assert render([_user(question), _assistant("B")], False) == f"<s>[INST] <image>\n{question} [/INST] B </s>"
    turns = [_user(question), _assistant("A: yes"), _user("Where?", image=False)]
    assert render(turns, True) == bos + llava_med_prompt([("USER", "<image>\n" + question), ("ASSISTANT", "A: yes"),
                                                          ("USER", "Where?"), ("ASSISTANT", None)])
    system = [{"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]}]
    assert render(system + [_user(question)], True) == bos + llava_med_prompt(
        [("USER", "<image>\n" + question), ("ASSISTANT", None)], system="You are a radiologist.")
    assert processor.chat_template == processor.tokenizer.chat_template == LLAVA_MED_CHAT_TEMPLATE


def test_the_eval_adapter_asks_as_llava_med_does(converted, unconfuse_home):
    """The preset twin (tiny-llava-med, built by the same converter) through eval's backend and the
    reference's llava_med prompt: LLaVA-Med's text after one BOS, the reply scored as LLaVA-Med's "▁A"."""
    from unconfuse.eval.models import Query, load_model
    from unconfuse.eval.prompts import load_prompts
    from unconfuse.eval.world import prepare

    prepare(models=["tiny-llava-med"])
    backend, spec = load_model("tiny-llava-med", device="cpu")
    assert spec.prompt_key == "llava_med"
    prompt = load_prompts().render("mc", "Which side is the lesion on?", ("left", "right"), key=spec.prompt_key)
    assert prompt.endswith("Answer: ")
    assert backend.render(prompt) == backend.tokenizer.bos_token + llava_med_prompt(
        [("USER", "<image>\n" + prompt), ("ASSISTANT", None)])
    query = Query("img", Image.new("RGB", (40, 24), (90, 90, 90)), prompt, ("left", "right"), {})
    ids = backend._inputs([query])["input_ids"][0].tolist()
    assert ids.count(backend.tokenizer.bos_token_id) == 1 and ids[0] == backend.tokenizer.bos_token_id
    letters = backend.letter_token_ids(("A", "B"), query)
    assert backend.tokenizer.convert_ids_to_tokens(letters) == ["▁A", "▁B"]  # as the reference's encode("A")


def test_assistant_replies_are_marked_for_assistant_only_loss(converted):
    _, processor = converted
    user = {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32))},
                                        {"type": "text", "text": "Is there a fracture?"}]}
    out = processor.apply_chat_template([user, _assistant("A")], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    mask = out["assistant_masks"][0]
    assert [t for t, m in zip(tokens, mask) if m] == ["▁A", "▁", "</s>"]
    assert tokens.count("<s>") == 1


def _rewrite_shard(src, drop=(), add=None):
    """Drop tensors from (or add one to) the original's shards, keeping its index true."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for path in sorted(src.glob("model-*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if k not in drop}
        if add and path.name.startswith("model-00001"):
            tensors |= add
            index["weight_map"] |= {k: path.name for k in add}
        save_file(tensors, str(path), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in drop}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("case", ["no config", "not llava-med", "missing tensor", "extra tensor", "missing shard",
                                  "out is not a conversion", "tokenizer too large"])
def test_bad_input_is_one_line_naming_what(original, tmp_path, capsys, case):
    src = tmp_path / "src"
    shutil.copytree(original / "src", src)
    tower, out = original / "tower", tmp_path / "out"
    if case == "no config":
        (src / "config.json").unlink()
        expected = "no config.json"
    elif case == "not llava-med":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(config | {"model_type": "llava_llama"}))
        expected = "'llava_llama'"
    elif case == "missing tensor":
        _rewrite_shard(src, drop={"model.mm_projector.2.bias"})
        expected = "missing tensor 'model.mm_projector.2.bias'"
    elif case == "extra tensor":
        _rewrite_shard(src, add={"model.image_newline": torch.zeros(64)})
        expected = "'model.image_newline' has no place"
    elif case == "missing shard":
        (src / "model-00002-of-00002.safetensors").unlink()
        expected = "shard model-00002-of-00002.safetensors"
    elif case == "out is not a conversion":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "is not a converted model"
    else:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
        expected = "has vocab_size 100"
    code, stdout, err = _convert(capsys, src, tower, out)
    assert code == 2 and not stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err
    if case != "out is not a conversion":
        assert not out.exists()  # nothing half-written
    else:
        assert (out / "notes.txt").read_text() == "mine"
