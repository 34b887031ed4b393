"""Benchmark 8 — memory of notebook 04's text-then-vision sequence: the text model in use, after ``unload_model``,
the LLaVA composite built around the same decoder, and after a forward on image prompts. At each stage: resident
set, its anonymous part (tensors) and its file-backed part (the memory-mapped weights), and the high-water mark.
Also the size of the composite's input embedding and output layer, and whether they are copies: they are the base's
own (memory-mapped) tensors unless an ``<image>`` row had to be added (a tokenizer with no image placeholder of its
own that already fills the vocabulary, as SmolLM2's does; Qwen's ``<|image_pad|>`` is reused).

Default ``--model llava-qwen2.5-0.5b`` (base ``qwen2.5-0.5b``); ``--quick`` uses ``llava-smollm2``.
"""

from __future__ import annotations

import gc

from common import Bench, PeakRSS, memory_status, parser, setup_torch

#: The names the results use (those of /proc/self/status) for :func:`common.memory_status`'s fields.
_NAMES = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}


def _status_gb() -> dict:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in GiB."""
    status = memory_status()
    return {name: round(status[key] / 2**30, 3) for name, key in _NAMES.items()}


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="image prompts in the forward (default %(default)s)")
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.models.loading import load_model, unload_model
    from crvlm_core.models.specs import COMPOSITES
    from crvlm_core.steer.score import refusal_score

    spec = "llava-smollm2" if args.quick else (args.model if args.model in COMPOSITES else "llava-qwen2.5-0.5b")
    base_spec = COMPOSITES[spec]
    bench = Bench("llava_memory", args, composite=spec, base=base_spec, images=args.images)
    stages = {}
    with PeakRSS(0.01) as peak:
        text = load_model(base_spec)
        refusal_score(text, ["What is a cell?"] * 4, [])
        base_rows = text.hf_model.get_input_embeddings().weight.shape[0]
        stages["text model in use"] = _status_gb()
        del text
        unload_model()
        gc.collect()
        stages["text model unloaded"] = _status_gb()
        vlm = load_model(spec)
        stages["composite built"] = _status_gb()
        mm = list(load_dataset("mm_subjects"))[: args.images]
        refusal_score(vlm, [s.prompt for s in mm], [], images=[s.load_image() for s in mm])
        stages["composite after a forward on image prompts"] = _status_gb()
    hf = vlm.hf_model
    emb, out = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    tied = emb.data_ptr() == out.data_ptr()
    size_bytes = emb.numel() * emb.element_size() + (0 if tied else out.numel() * out.element_size())
    rows = {"embedding_rows": int(emb.shape[0]), "base_embedding_rows": int(base_rows),
            "embedding_and_output_copied": int(emb.shape[0]) != int(base_rows),
            "image_token_id": int(hf.config.image_token_id), "tokenizer_length": len(vlm.tokenizer), "output_tied": tied,
            "embedding_and_output_bytes_gb": round(size_bytes / 2**30, 3)}
    bench.results.update(stages=stages, peak_rss_gb=round(peak.peak / 2**30, 3), **rows)
    for name, st in stages.items():
        bench.log(f"{name:45s} {st}")
        bench.add(f"{name}: RSS (anonymous + file-backed)", st["VmRSS"], "GB")
        bench.add(f"{name}: anonymous", st["RssAnon"], "GB")
    bench.add("peak RSS of the sequence", round(peak.peak / 2**30, 3), "GB", "≤ 4", peak.peak <= 4 * 2**30)
    copied = "copies" if rows["embedding_and_output_copied"] else "the base's own"
    bench.add(f"composite's embedding + output layer ({rows['embedding_rows']} rows, tied {tied}, {copied})",
              rows["embedding_and_output_bytes_gb"], "GB")
    bench.write()


if __name__ == "__main__":
    main()
