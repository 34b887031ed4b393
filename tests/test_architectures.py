"""Offline VLM builders: tiny random miniatures of each family, and LLaVA composites around a causal LM."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from crvlm_core.models.llava import build_llava_around
from crvlm_core.models.tiny_vlms import TINY_FAMILIES, build_tiny_vlm
from crvlm_core.models.vlm_parts import VLMParts, wrap_chat_template

QUESTION = "What is the function of mitochondria?"


def _image(size: int = 64, color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (size, size), (240, 230, 210))
    ImageDraw.Draw(img).ellipse((size // 8, size // 4, size - size // 8, size - size // 4), fill=color)
    return img


def _prompt(parts: VLMParts, text: str, image: bool = True) -> str:
    content = [{"type": "image"}, {"type": "text", "text": text}] if image else text
    return parts.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _image_token_id(parts: VLMParts) -> int:
    cfg = parts.model.config
    return cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request) -> VLMParts:
    return build_tiny_vlm(request.param, seed=0)


def _batch(parts: VLMParts):
    texts = [_prompt(parts, "What is this?"), _prompt(parts, "Describe the picture in a few words, please.")]
    return parts.processor(
        text=texts, images=[_image(64), _image(32, (30, 30, 200))], return_tensors="pt", padding=True
    )


def test_tiny_is_small_float32_eval(tiny):
    n = sum(p.numel() for p in tiny.model.parameters())
    assert 1_000_000 < n < 10_000_000
    assert not tiny.model.training
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    assert tiny.family in TINY_FAMILIES and tiny.image_size == 32
    assert tiny.processor.tokenizer.padding_side == "left"


def test_tiny_vocab_covers_tokenizer(tiny):
    vocab = tiny.model.get_input_embeddings().weight.shape[0]
    assert vocab >= len(tiny.processor.tokenizer)
    assert _image_token_id(tiny) == tiny.processor.tokenizer.convert_tokens_to_ids(
        "<|image_pad|>" if tiny.family == "qwen2_vl" else "<image>"
    )


def test_tiny_batched_forward_left_padded_and_layer_shapes(tiny):
    inputs = _batch(tiny)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 2
    assert (inputs["attention_mask"][:, -1] == 1).all(), "left padding: last position is real for every row"
    n_image_tokens = (ids == _image_token_id(tiny)).sum(dim=1)
    assert (n_image_tokens > 0).all() and n_image_tokens[0] == n_image_tokens[1]

    hidden = tiny.model.config.get_text_config().hidden_size
    shapes = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        shapes.append(tuple(out.shape))

    handles = [layer.register_forward_hook(hook) for layer in tiny.layers]
    try:
        with torch.no_grad():
            out = tiny.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert len(shapes) == len(tiny.layers) >= 2
    assert all(s == (2, ids.shape[1], hidden) for s in shapes)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()


def test_tiny_generate(tiny):
    inputs = _batch(tiny)
    with torch.no_grad():
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert not (out[:, -3:] == _image_token_id(tiny)).any()


def test_tiny_chat_template_text_only_and_image_before_text(tiny):
    text_only = _prompt(tiny, "hello there", image=False)
    assert "hello there" in text_only and "[{" not in text_only and "'type'" not in text_only
    with_image = _prompt(tiny, "hello there")
    if tiny.family == "instructblip":  # its processor prepends the query tokens itself
        assert with_image == text_only
    else:
        placeholder = "<|image_pad|>" if tiny.family == "qwen2_vl" else "<image>"
        assert with_image.index(placeholder) < with_image.index("hello there")


def test_tiny_seeded(tiny):
    family = tiny.family
    same = build_tiny_vlm(family, seed=0).model.state_dict()
    other = build_tiny_vlm(family, seed=1).model.state_dict()
    ref = tiny.model.state_dict()
    assert same.keys() == ref.keys()
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    assert any(not torch.equal(other[k], ref[k]) for k in ref)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_vlm("blip9")


def test_wrap_chat_template_renders_lists_and_strings():
    from jinja2 import Template

    inner = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}|{% endfor %}"
    t = Template(wrap_chat_template(inner, "<image>"))
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "Q?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
    ]
    assert t.render(messages=msgs) == "[system]be brief|[user]<image>\nQ?|[assistant]A.|"


# --- LLaVA around a causal LM -------------------------------------------------------------------------


_TOY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _assert_text_logits_equal(parts: VLMParts, lm, tok, text: str) -> None:
    inputs = parts.processor(text=[text], return_tensors="pt")
    ref = tok(text, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ref["input_ids"])
    with torch.no_grad():
        got = parts.model(**inputs).logits[..., : lm.config.vocab_size]
        want = lm(**ref).logits
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize(("tied", "spare_rows", "placeholder"),
                         [(True, 0, False), (False, 0, False), (False, 7, False), (False, 0, True)])
def test_llava_around_toy_lm(tied, spare_rows, placeholder):
    """Tied (SmolLM2-like) and untied (Qwen2.5-like, whose vocab also has unused spare rows) output layers; a
    tokenizer with its own image placeholder inside the vocabulary (Qwen's ``<|image_pad|>``) keeps its rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from crvlm_core.models.llava import LLAVA_AROUND_BUILD
    from crvlm_core.models.tiny_vlms import _tiny_tokenizer
    from crvlm_core.models.vlm_parts import add_special_tokens as _add_special

    tok = _tiny_tokenizer()  # a fresh copy of SmolLM2's tokenizer
    tok.padding_side = "right"
    tok.chat_template = _TOY_TEMPLATE
    if placeholder:
        _add_special(tok, ["<|image_pad|>"])
    torch.manual_seed(3)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok) + spare_rows,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            tie_word_embeddings=tied,
        )
    ).eval()
    n_tok, lm_state = len(tok), {k: v.clone() for k, v in lm.state_dict().items()}

    parts = build_llava_around(lm, tok, seed=0, image_size=32, patch_size=8)

    assert len(tok) == n_tok and tok.padding_side == "right", "caller's tokenizer unchanged"
    assert all(torch.equal(lm_state[k], v) for k, v in lm.state_dict().items()), "caller's LM unchanged"
    m = parts.model
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    assert m.config.crvlm_build == LLAVA_AROUND_BUILD
    assert (m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()) == tied
    # the embedding and output layer are the LM's own tensors exactly when no row had to be added
    grown = not placeholder and spare_rows == 0
    assert (m.get_input_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()) != grown
    assert (m.lm_head.weight.data_ptr() == lm.lm_head.weight.data_ptr()) != grown
    assert m.get_input_embeddings().weight.shape[0] == lm.config.vocab_size + grown
    if placeholder:
        assert _image_token_id(parts) == tok.convert_tokens_to_ids("<|image_pad|>")
        assert "<image>" not in parts.processor.tokenizer.get_vocab()
    _assert_text_logits_equal(parts, lm, tok, _prompt(parts, QUESTION, image=False))
    inputs = parts.processor(text=[_prompt(parts, QUESTION)], images=[_image(50)], return_tensors="pt")
    assert (inputs["input_ids"] == _image_token_id(parts)).sum().item() == 16
    with torch.no_grad():
        assert torch.isfinite(m(**inputs).logits).all()
    again = build_llava_around(lm, tok, seed=0, image_size=32, patch_size=8).model
    assert all(torch.equal(a, b) for a, b in zip(m.model.vision_tower.parameters(), again.model.vision_tower.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(m.model.multi_modal_projector.parameters(),
                                                 again.model.multi_modal_projector.parameters()))
    assert not torch.equal(m.model.multi_modal_projector.linear_1.weight,
                           build_llava_around(lm, tok, seed=1, image_size=32, patch_size=8).model
                           .model.multi_modal_projector.linear_1.weight), "the seed sets the vision part"


# --- LLaVA around the real SmolLM2 (loaded once per session from the per-machine cache) -----------------------------------


@pytest.fixture(scope="module")
def smollm2_parts(smollm2):
    """The real SmolLM2 (shared session fixture from conftest: loaded once, from the per-machine cache)."""
    return smollm2.hf_model, smollm2.tokenizer


@pytest.fixture(scope="module")
def smollm2_llava(smollm2_parts):
    lm, tok = smollm2_parts
    return build_llava_around(lm, tok, seed=0)


def _cell(size: int = 64) -> Image.Image:
    """A synthetic micrograph: a pink cell with a purple nucleus and green organelles."""
    img = Image.new("RGB", (size, size), (240, 225, 210))
    d = ImageDraw.Draw(img)
    d.ellipse((6, 14, 58, 50), fill=(200, 120, 140), outline=(120, 40, 60), width=2)
    d.ellipse((26, 26, 38, 38), fill=(90, 40, 110))
    for x in range(12, 52, 9):
        d.ellipse((x, 19, x + 6, 24), fill=(60, 140, 60))
    return img


def test_llava_around_smollm2_text_only_logits_equal(smollm2_parts, smollm2_llava):
    lm, tok = smollm2_parts
    parts = smollm2_llava
    assert parts.layers_path == "model.language_model.layers" and len(parts.layers) == 30
    assert parts.model.lm_head.weight.data_ptr() == parts.model.get_input_embeddings().weight.data_ptr()
    assert "<image>" not in tok.get_vocab(), "caller's tokenizer unchanged"
    _assert_text_logits_equal(parts, lm, tok, _prompt(parts, QUESTION, image=False))


def test_llava_around_smollm2_with_image(smollm2_llava):
    parts = smollm2_llava
    text = _prompt(parts, QUESTION)
    assert text.index("<image>") < text.index(QUESTION)
    inputs = parts.processor(text=[text], images=[_cell()], return_tensors="pt")
    assert (inputs["input_ids"] == _image_token_id(parts)).sum().item() == 16
    with torch.no_grad():
        out = parts.model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = parts.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nSmolLM2-LLaVA, cell image + {QUESTION!r}: {answer!r}")
    assert answer.strip()
    assert _image_token_id(parts) not in out[0, inputs["input_ids"].shape[1] :].tolist()
