"""Benchmark 3 — peer comparison: the same ActAdd (vector, layer, strength, prompts, batch, greedy decoding) through
crvlm (``steered_generate`` + ``AddVector``) and through the ``steering-vectors`` library
(``SteeringVector.apply`` around ``model.generate``), plus ``repeng`` when it imports. Outputs are checked equal
(generated token ids, and the steered next-token logits of one forward), then timed on the same batches.
Goal (issue #9): crvlm ≤ 1.0× the peer's time.

``steering-vectors`` 0.12.2 declares ``transformers<5`` but works with transformers 5 when installed without its
dependencies: ``pip install --no-deps steering-vectors==0.12.2`` (what ``make bench`` does when it is missing).
``repeng`` 0.4.0 needs ``numpy<2`` and fails to import under numpy 2 (recorded as not available).
"""

from __future__ import annotations

import torch

from common import Bench, interleaved, parser, prompts, setup_torch


def peer_status() -> dict:
    status = {}
    for name in ("steering_vectors", "repeng"):
        try:
            __import__(name)
            status[name] = "ok"
        except Exception as exc:  # not installed, or incompatible with this environment
            status[name] = f"not available: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if status["repeng"].startswith("not available: ModuleNotFoundError"):
        status["repeng"] = "not available: repeng 0.4.0 requires numpy<2 (with --no-deps it fails to import: np.float_)"
    return status


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.extract import prompt_batches
    from crvlm_core.models.loading import load_model
    from crvlm_core.methods.refusal_vectors import VectorConfig, default_layers, fit_vector
    from crvlm_core.steer.generate import steered_generate
    from crvlm_core.steer.interventions import AddVector
    from crvlm_core.steer.score import steered_logits

    batch = args.batch or (4 if args.quick else 8)
    n = batch * (1 if args.quick else 2)
    new = args.max_new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    alpha = 1.0
    handle = load_model(args.model)
    layer = default_layers(handle)[0]
    status = peer_status()
    bench = Bench("peers", args, batch=batch, n_prompts=n, max_new_tokens=new, repeats=repeats, layer=layer,
                  alpha=alpha, peers=status)
    train = prompts(16 if args.quick else 32, seed=3)
    vector = fit_vector(handle, train, VectorConfig("teacher-forced", layers=[layer]), progress=False)
    v = vector.directions[layer].to(handle.device, handle.dtype)
    ps = [s.prompt for s in prompts(n)]
    enc0 = handle.build_inputs(ps[:batch])
    gen_kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=handle.tokenizer.pad_token_id)
    ours = [AddVector(vector.directions, (layer,), alpha)]

    def run_crvlm():
        return steered_generate(handle, ps, ours, max_new_tokens=new, batch_size=batch)

    texts_ours = run_crvlm()
    if status["steering_vectors"] == "ok":
        from steering_vectors import SteeringVector as PeerVector

        sv = PeerVector(layer_activations={layer: v}, layer_type="decoder_block")

        def run_peer():  # the same work as steered_generate: the same length-grouped batches, generate, decode
            texts = [""] * n
            with torch.no_grad(), sv.apply(handle.hf_model, multiplier=alpha):
                for _, idx in prompt_batches(handle, ps, [False] * n, batch):
                    enc = handle.build_inputs([ps[k] for k in idx])
                    ids = handle.hf_model.generate(**enc, **gen_kw).cpu()
                    for k, text in zip(idx, handle.decode_new(ids, enc["input_ids"].shape[1])):
                        texts[k] = text
            return texts

        texts_peer = run_peer()
        with torch.no_grad():
            logits_ours = steered_logits(handle, enc0, ours)
            with sv.apply(handle.hf_model, multiplier=alpha):
                logits_peer = handle.hf_model(**enc0).logits.cpu()
        mask = enc0["attention_mask"].bool().cpu()
        diff = float((logits_ours - logits_peer)[mask].abs().max())
        same_text = sum(a == b for a, b in zip(texts_ours, texts_peer))
        times = interleaved({"crvlm": run_crvlm, "steering_vectors": run_peer}, repeats, warmup=1)
        t_ours, t_peer = times["crvlm"], times["steering_vectors"]
        bench.results["crvlm"] = t_ours
        ratio = t_ours["median"] / t_peer["median"]
        bench.log(f"crvlm {t_ours['median']:.2f} s, steering-vectors {t_peer['median']:.2f} s")
        bench.results["steering_vectors"] = {**t_peer, "same_text": same_text, "n": n,
                                             "max_abs_logit_diff_real_tokens": diff, "ratio_crvlm_to_peer": ratio}
        bench.log(f"steering-vectors: {t_peer['median']:.2f} s; same text {same_text}/{n}; logit diff {diff:.2e}")
        bench.add("ActAdd: same generated text as steering-vectors", f"{same_text}/{n}", "", f"{n}/{n}", same_text == n)
        bench.add("ActAdd: max abs logit difference vs steering-vectors", diff, "", "≤ 1e-3", diff <= 1e-3)
        bench.add("ActAdd: crvlm / steering-vectors time", ratio, "×", "≤ 1.0", ratio <= 1.0)
        bench.add("ActAdd: crvlm / steering-vectors time (CPU)", t_ours["cpu_median"] / t_peer["cpu_median"], "×")
    else:
        bench.add("ActAdd vs steering-vectors", status["steering_vectors"], "")
    if status["repeng"] != "ok":
        bench.add("ActAdd vs repeng", status["repeng"][:80], "")
    bench.write()


if __name__ == "__main__":
    main()
