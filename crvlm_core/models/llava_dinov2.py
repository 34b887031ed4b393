"""``llava-dinov2-qwen2.5-0.5b``: a LLaVA that sees. The real DINOv2 ViT-S/14 tower (:mod:`crvlm_core.models.dinov2`)
and a trained projector around the embedded Qwen2.5-0.5B, in transformers' ``LlavaForConditionalGeneration``. An image
becomes 17 tokens before the question: DINOv2's CLS feature and its 16 × 16 patch features average-pooled to 4 × 4,
each normalised by DINOv2's own final LayerNorm and mapped by a two-layer MLP into the LM's embedding space. The
projector's weights ship in the repository (``weights/``; ``scripts/train_projector.py`` made them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from crvlm_core.models.llava import composite_tokenizer, finish_composite, text_config
from crvlm_core.models.specs import ModelLoadError
from crvlm_core.models.vlm_parts import VLMParts, llava_processor

__all__ = ["IMAGE_SIDE", "LLAVA_DINOV2_BUILD", "PROJECTOR_FILE", "PooledProjector", "build_llava_dinov2",
           "load_projector_state"]

IMAGE_SIDE = 224
GRID = 4
LLAVA_DINOV2_BUILD = "llava-dinov2-1"
"""How :func:`build_llava_dinov2` builds the model (keys caches together with the projector file's SHA-256)."""
PROJECTOR_FILE = Path(__file__).resolve().parent / "weights" / "projector-dinov2-qwen2.5-0.5b.safetensors"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class PooledProjector(nn.Module):
    """DINOv2 features ``[batch, 1 + side², width]`` (CLS first, LLaVA's ``"full"`` selection) → ``1 + grid²`` LM
    embeddings: LayerNorm (DINOv2's final one, frozen), patches average-pooled to ``grid × grid``, Linear → GELU →
    Linear. :meth:`pool` is the fixed part, so a trainer can cache its output per picture."""

    def __init__(self, vision_width: int, text_width: int, grid: int = GRID):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(vision_width, eps=1e-6)
        self.norm.requires_grad_(False)
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_width, text_width)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm(features)
        cls, patches = x[:, :1], x[:, 1:]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ValueError(f"expected a square grid of patch features, got {patches.shape[1]}")
        grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        pooled = nn.functional.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
        return torch.cat([cls, pooled], dim=1)

    def mlp(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(pooled)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(features))


def load_projector_state(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The trained projector's weights (float32), with a readable error for a missing or damaged file."""
    from safetensors.torch import load_file

    path = Path(path or PROJECTOR_FILE)
    if not path.exists():
        raise ModelLoadError(f"projector weights not found: {path} (train them with scripts/train_projector.py)")
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as err:  # safetensors raises its own types for a damaged file
        raise ModelLoadError(f"projector weights {path} are damaged ({type(err).__name__})") from None


def build_llava_dinov2(language_model, tokenizer, tower, projector: str | Path | dict | None = "trained",
                       seed: int = 0) -> VLMParts:
    """Wrap the real LM under the converted DINOv2 tower and a projector.

    Args:
        language_model: the embedded Qwen2.5-0.5B (its decoder tensors are shared, not copied; see
            :func:`~crvlm_core.models.llava.build_llava_around`).
        tokenizer: its tokenizer (Qwen's ``<|image_pad|>`` becomes the image token).
        tower: the ``Dinov2Model`` from :func:`~crvlm_core.models.dinov2.load_dinov2`.
        projector: ``"trained"`` (the shipped weights), a path or state dict, or ``None`` (an untrained projector
            initialised after ``seed``, for comparisons).
        seed: seed of an untrained projector.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    old_vocab = language_model.get_input_embeddings().weight.shape[0]
    tok, image_token, image_id = composite_tokenizer(tokenizer, old_vocab)
    new_vocab = max(old_vocab, image_id + 1)
    lm_config, tied = text_config(language_model, new_vocab)
    config = LlavaConfig(text_config=lm_config, vision_config=tower.config, image_token_index=image_id,
                         vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).float()
    model.model.vision_tower = tower
    width, text_width = tower.config.hidden_size, lm_config.hidden_size
    proj = PooledProjector(width, text_width)
    if projector is None:
        torch.manual_seed(seed)
        proj.linear_1.reset_parameters()
        proj.linear_2.reset_parameters()
        proj.norm.load_state_dict(tower.layernorm.state_dict())
        tag = f"untrained-seed{seed}"
    else:
        if isinstance(projector, dict):
            state = projector
        else:
            state = load_projector_state(None if projector == "trained" else projector)
        try:
            proj.load_state_dict(state)
        except RuntimeError as err:
            raise ModelLoadError(f"projector weights do not fit ({str(err).splitlines()[0]})") from None
        tag = _projector_tag(projector)
    model.config.crvlm_build = f"{LLAVA_DINOV2_BUILD}+{tag}"  # keys caches: another projector, other outputs
    model.model.multi_modal_projector = proj.requires_grad_(False)
    processor = llava_processor(tok, IMAGE_SIDE, IMAGE_SIDE // GRID, tok.chat_template, image_token,
                                strategy="full", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return finish_composite(model, language_model, processor, image_id, new_vocab, tied, IMAGE_SIDE)


def _projector_tag(projector) -> str:
    if isinstance(projector, dict):
        return "state-dict"
    from crvlm_core.core.io import file_sha256

    path = PROJECTOR_FILE if projector == "trained" else Path(projector)
    return f"{path.name}:{file_sha256(path)[:16]}"


def projector_manifest() -> dict:
    """The shipped projector's training record (``weights/…json`` next to the weights), or ``{}``."""
    meta = PROJECTOR_FILE.with_suffix(".json")
    return json.loads(meta.read_text()) if meta.exists() else {}
