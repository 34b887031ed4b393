"""Batched residual-stream capture through nnsight: every decoder layer's output, read at one token position per
sample (or averaged over a set of positions), streamed to CPU and cached (:mod:`crvlm_core.core.cache`) by fingerprint.

Positions: ``last`` — the last prompt token, or with ``assistant_prefix`` the prefix's last token (teacher forcing);
``prefix-mean`` — the mean over the prefix's tokens; ``image-mean`` — the mean over image-token positions.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from crvlm_core.core.cache import cached_tensors
from crvlm_core.core.io import sha256_hex
from crvlm_core.data.schema import Sample, fingerprint as data_fingerprint
from crvlm_core.models.handle import ModelHandle

__all__ = ["POSITIONS", "Activations", "image_batches", "prompt_batches", "extract", "extract_token_states",
           "extraction_fingerprint", "position_weights", "read_last_token"]

POSITIONS = ("last", "prefix-mean", "image-mean")
CACHE_VERSION = 1


@dataclass
class Activations:
    """Activations of ``n`` samples at ``len(layers)`` layers.

    Attributes:
        acts: ``Float[Tensor, "n n_layers d"]`` on CPU, float32.
        ids: sample ids, in the order of the rows.
        layers: the model layers of the second axis.
        fingerprint: hash of (model, data, settings) that keys the cache.
        meta: the settings it was read with.
    """

    acts: torch.Tensor
    ids: list[str]
    layers: list[int]
    fingerprint: str
    meta: dict = field(default_factory=dict)
    from_cache: bool = False

    def at(self, layer: int) -> torch.Tensor:
        """``[n, d]`` activations of one model layer."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not extracted (have {self.layers[0]}..{self.layers[-1]})")
        return self.acts[:, self.layers.index(layer)]

    def select(self, ids: Sequence[str]) -> torch.Tensor:
        """Rows for the given sample ids, in that order."""
        index = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} ids not in these activations, e.g. {missing[:3]}")
        return self.acts[[index[i] for i in ids]]


def extraction_fingerprint(handle: ModelHandle, samples: Sequence[Sample], position: str, layers: Sequence[int],
                           system: str | None, assistant_prefix: str | None) -> str:
    """Stable hash of everything an extraction depends on."""
    return sha256_hex(json.dumps({
        "v": CACHE_VERSION, "model": handle.key, "dtype": str(handle.dtype), "data": data_fingerprint(samples),
        "position": position, "layers": list(layers), "system": system, "prefix": assistant_prefix,
    }, sort_keys=True))[:20]


def position_weights(handle: ModelHandle, enc: dict, prompts: Sequence[str], position: str,
                     assistant_prefix: str | None, system: str | None, images) -> torch.Tensor:
    """``[batch, seq]`` weights (rows sum to 1) that pick or average the positions to read."""
    ids = enc["input_ids"]
    b, seq = ids.shape
    w = torch.zeros(b, seq)
    if position == "last":
        w[:, -1] = 1.0
    elif position == "prefix-mean":
        if not assistant_prefix:
            raise ValueError("position 'prefix-mean' needs an assistant_prefix")
        plain = handle.build_inputs(prompts, images, system)["attention_mask"].sum(1)
        full = enc["attention_mask"].sum(1)
        n_prefix = (full - plain).clamp(min=1)
        for r in range(b):
            w[r, seq - int(n_prefix[r]):] = 1.0 / float(n_prefix[r])
    elif position == "image-mean":
        token_id = _image_token_id(handle)
        mask = (ids.cpu() == token_id).float()
        if (mask.sum(1) == 0).any():
            raise ValueError("position 'image-mean' needs an image in every sample of the batch")
        w = mask / mask.sum(1, keepdim=True)
    else:
        raise ValueError(f"unknown position {position!r}; choose from {POSITIONS}")
    return w


def _image_token_id(handle: ModelHandle) -> int:
    cfg = handle.hf_model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    token = getattr(handle.processor, "image_token", None)
    if token is None:
        raise ValueError(f"{handle.spec} has no image token")
    return handle.tokenizer.convert_tokens_to_ids(token)


def _capture(handle: ModelHandle, enc: dict, weights: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """One traced forward: ``[batch, len(layers), d]`` weighted reads of the decoder-layer outputs."""
    w = weights.to(device=handle.device, dtype=handle.dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with handle.model.trace(enc, **handle.trace_options()) as tracer:
            reads = nnsight.save([torch.einsum("bsd,bs->bd", handle.layers[i].output, w).detach().cpu()
                                  for i in layers])
            # Nothing after the last read layer is needed: stop there (skips the rest of the stack and the
            # vocabulary projection, a quarter of a forward on Qwen2.5-0.5B).
            tracer.stop()
    return torch.stack([r.float() for r in reads], dim=1)


def image_batches(has_image: Sequence[bool], batch_size: int,
                  lengths: Sequence[int] | None = None) -> list[tuple[bool, list[int]]]:
    """Row indices grouped by image presence (a VLM batch has images for all rows or none), then cut into batches
    of at most ``batch_size``: ``[(has_image, [row, …]), …]``, image batches first.

    With ``lengths`` (the prompts' token counts, :meth:`ModelHandle.prompt_lengths`) each group is ordered by
    length first (stable), so a batch holds prompts of similar length and left padding costs little: on notebook
    02's MMLU split in batches of 8, padding inflates the prompt tokens by 55 % in the given order and by 3 %
    sorted, and the prompt pass is compute-bound on a CPU. Callers scatter results back by row index, so the order
    of rows does not matter. A group that fits in one batch keeps the given order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = {flag: [k for k, h in enumerate(has_image) if bool(h) == flag] for flag in (True, False)}
    if lengths is not None:
        if len(lengths) != len(has_image):
            raise ValueError(f"image_batches: {len(lengths)} lengths for {len(has_image)} rows")
        # a group that fits one batch keeps its order: sorting it saves nothing, and per-row state set in the
        # caller's order (a gate override of shape [batch]) stays aligned with the rows
        groups = {flag: sorted(idx, key=lambda k: lengths[k]) if len(idx) > batch_size else idx
                  for flag, idx in groups.items()}
    return [(flag, idx[i:i + batch_size]) for flag, idx in groups.items() for i in range(0, len(idx), batch_size)]


def prompt_batches(handle: ModelHandle, prompts: Sequence[str], has_image: Sequence[bool],
                   batch_size: int) -> list[tuple[bool, list[int]]]:
    """:func:`image_batches` keyed by the prompts' token counts: the batches extraction, refusal scores and steered
    generation run (prompts of similar length together)."""
    return image_batches(has_image, batch_size, lengths=handle.prompt_lengths(prompts))


def read_last_token(handle: ModelHandle, enc: dict, layers: Sequence[int]) -> torch.Tensor:
    """Unsteered ``[batch, len(layers), d]`` states at the last input token of prepared inputs (one forward)."""
    w = torch.zeros(enc["input_ids"].shape)
    w[:, -1] = 1.0
    return _capture(handle, enc, w, layers)


def extract_token_states(handle: ModelHandle, samples: Sequence[Sample], layers: Sequence[int], per_sample: int = 8,
                         seed: int = 0, batch_size: int = 8, use_images: bool = True,
                         cache_dir: bool | str | Path | None = True,
                         progress: bool | str = True) -> tuple[torch.Tensor, torch.Tensor]:
    """States at several token positions of each prompt: the last one plus ``per_sample`` others drawn (seeded) from
    its real tokens — the positions a steering hook also sees at generation.

    ``cache_dir``: True → ``outputs/cache/``, a path → that folder, None/False → no cache (entry ``token-states``).
    ``progress``: False hides the bar, a string names it.

    Returns:
        ``(acts [N, len(layers), d], owner [N])`` with ``owner[k]`` the index of the sample row ``k`` came from.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("extract_token_states: no samples (empty split?)")
    layers = sorted({handle.check_layer(int(l)) for l in layers})
    use_images = use_images and handle.is_vlm
    position = f"tokens:{per_sample}:{seed}"
    fp = extraction_fingerprint(handle, samples if use_images else [_without_image(s) for s in samples],
                                position, layers, None, None)
    meta = {"model": handle.spec, "position": position, "layers": layers, "n": len(samples),
            "hidden_size": handle.hidden_size, "use_images": use_images, "fingerprint": fp,
            "ids": [s.id for s in samples]}
    desc = progress if isinstance(progress, str) else "extract token states"

    def compute() -> tuple[dict, dict]:
        acts, owner = _token_states(handle, samples, layers, per_sample, seed, batch_size, use_images,
                                    desc if progress else None)
        return {"acts": acts, "owner": owner}, {**meta, "rows": len(acts)}

    tensors, _, _ = cached_tensors(cache_dir, "token-states", fp, compute)
    return tensors["acts"], tensors["owner"]


def _token_states(handle: ModelHandle, samples: list[Sample], layers: list[int], per_sample: int, seed: int,
                  batch_size: int, use_images: bool, desc: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    chunks, owners = [], []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, unit="batch"):
        idx = list(range(start, min(start + batch_size, len(samples))))
        has_img = use_images and all(samples[k].image is not None for k in idx)
        images = [samples[k].load_image() for k in idx] if has_img else None
        enc = handle.build_inputs([samples[k].prompt for k in idx], images)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with handle.model.trace(enc, **handle.trace_options()) as tracer:
                full = nnsight.save([handle.layers[i].output.detach().cpu() for i in layers])
                tracer.stop()
        full = torch.stack([f.float() for f in full], dim=2)  # [b, seq, L, d]
        mask = enc["attention_mask"].bool().cpu()
        for r, k in enumerate(idx):
            real = mask[r].nonzero().squeeze(-1)
            others = real[:-1][torch.randperm(len(real) - 1, generator=gen)[:per_sample]]
            pos = torch.cat([others, real[-1:]])
            chunks.append(full[r, pos])
            owners.append(torch.full((len(pos),), k))
    return torch.cat(chunks), torch.cat(owners)


def extract(handle: ModelHandle, samples: Sequence[Sample], *, position: str = "last", layers: Sequence[int] | None = None,
            system: str | None = None, assistant_prefix: str | None = None, batch_size: int = 8,
            use_images: bool = True, cache_dir: bool | str | Path | None = True,
            progress: bool | str = True) -> Activations:
    """Capture decoder-layer outputs of every sample at every requested layer.

    Args:
        handle: a loaded model.
        samples: the prompts (and images) to read.
        position: ``last``, ``prefix-mean`` or ``image-mean`` (see the module docstring).
        layers: model layers to keep (default: all).
        system: system prompt for every sample (prompt-based vectors).
        assistant_prefix: teacher-forced start of the assistant turn, e.g. ``"Sorry, I cannot"``.
        batch_size: prompts per forward pass (left-padded).
        use_images: feed each sample's image to a VLM (False reads the text alone).
        cache_dir: True → ``outputs/cache/``; a path → that folder; None/False → no cache (entry ``activations``,
            keyed by :func:`extraction_fingerprint`).
        progress: a progress bar over batches: True shows it, a string shows it under that name, False hides it.

    Returns:
        :class:`Activations` in the order of ``samples`` (``from_cache`` tells whether they were read from the cache).
    """
    samples = list(samples)
    if not samples:
        raise ValueError("extract: no samples (empty split?)")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose from {POSITIONS}")
    if batch_size < 1:
        raise ValueError("batch_size must be ≥ 1")
    layers = list(range(handle.n_layers)) if layers is None else sorted({handle.check_layer(int(l)) for l in layers})
    if not layers:
        raise ValueError("extract: no layers requested")
    use_images = use_images and handle.is_vlm
    fp = extraction_fingerprint(handle, samples if use_images else [_without_image(s) for s in samples],
                                position, layers, system, assistant_prefix)
    meta = {"model": handle.spec, "position": position, "layers": layers, "system": system,
            "assistant_prefix": assistant_prefix, "n": len(samples), "hidden_size": handle.hidden_size,
            "use_images": use_images, "fingerprint": fp}
    desc = progress if isinstance(progress, str) else f"extract {position}"

    def compute() -> tuple[dict, dict]:
        out = torch.empty(len(samples), len(layers), handle.hidden_size)
        batches = prompt_batches(handle, [s.prompt for s in samples],
                                 [use_images and s.image is not None for s in samples], batch_size)
        for has_img, idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            prompts = [samples[k].prompt for k in idx]
            images = [samples[k].load_image() for k in idx] if has_img else None
            enc = handle.build_inputs(prompts, images, system, assistant_prefix)
            w = position_weights(handle, enc, prompts, position, assistant_prefix, system, images)
            out[idx] = _capture(handle, enc, w, layers)
        if not torch.isfinite(out).all():
            raise FloatingPointError("extract: non-finite activations (NaN/inf) — check the model and dtype")
        return {"acts": out}, {**meta, "ids": [s.id for s in samples]}

    tensors, stored, hit = cached_tensors(cache_dir, "activations", fp, compute)
    stored = dict(stored)
    ids = stored.pop("ids")
    return Activations(tensors["acts"], ids, list(stored["layers"]), fp, stored, from_cache=hit)


def _without_image(s: Sample) -> Sample:
    return replace(s, image=None)
