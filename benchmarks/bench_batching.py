"""Benchmark 6 — batching by prompt length: the same prompts in batches of 8 in the order given vs grouped by token
length (``crvlm_core.extract.prompt_batches``, what extraction, refusal scores and
steered generation do). Left padding makes a batch as long as its longest prompt, and the prompt pass is
compute-bound on a CPU, so padded tokens cost as much as real ones.

Measured on notebook 02's MMLU split (100 + 50 per scope; 16 prompts with --quick): padded prompt tokens, the
prompt pass (all layers, last-position logits) and greedy generation of 12 new tokens on the held-out part; both
orders timed round-robin; ratios grouped / given. Outputs are checked equal row by row.
"""

from __future__ import annotations

import torch

from common import Bench, interleaved, parser, setup_torch


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.splits import assign_scope, split
    from crvlm_core.extract import image_batches, prompt_batches
    from crvlm_core.models.loading import load_model
    from crvlm_core.steer.score import accepts_logits_to_keep as _accepts_logits_to_keep

    handle = load_model(args.model)
    train, test = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=100, n_test=50, seed=42)
    prompts = [s.prompt for s in train + test]
    held_out = [s.prompt for s in test]
    if args.quick:
        prompts, held_out = prompts[:16], held_out[:8]
    repeats = args.repeats or 1
    batch, new_tokens = 8, 12
    bench = Bench("batching", args, n_prompts=len(prompts), n_generate=len(held_out), batch_size=batch,
                  max_new_tokens=new_tokens, repeats=repeats)
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(handle) else {}

    def encodings(texts, grouped):
        has_image = [False] * len(texts)
        order = prompt_batches(handle, texts, has_image, batch) if grouped else image_batches(has_image, batch)
        return [(idx, handle.build_inputs([texts[k] for k in idx])) for _, idx in order]

    encs = {g: encodings(prompts, g) for g in (False, True)}
    gen_encs = {g: encodings(held_out, g) for g in (False, True)}
    tokens = {}
    for g, batches in encs.items():
        padded = sum(int(e["input_ids"].numel()) for _, e in batches)
        real = sum(int(e["attention_mask"].sum()) for _, e in batches)
        tokens["grouped" if g else "given"] = {"padded": padded, "real": real, "padding_overhead": padded / real - 1}

    def forward(grouped):
        def run():
            last = torch.empty(len(prompts), handle.hf_model.config.get_text_config().vocab_size)
            with torch.no_grad():
                for idx, enc in encs[grouped]:
                    last[idx] = handle.hf_model(**enc, **keep).logits[:, -1].float()
            return last
        return run

    def generate(grouped):
        def run():
            texts = [""] * len(held_out)
            with torch.no_grad():
                for idx, enc in gen_encs[grouped]:
                    ids = handle.hf_model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                                   pad_token_id=handle.tokenizer.pad_token_id)
                    for k, t in zip(idx, handle.decode_new(ids, enc["input_ids"].shape[1])):
                        texts[k] = t
            return texts
        return run

    times = interleaved({"forward_given": forward(False), "forward_grouped": forward(True),
                         "generate_given": generate(False), "generate_grouped": generate(True)}, repeats, warmup=0)
    same_logits = float((forward(False)() - forward(True)()).abs().max())
    a, b = generate(False)(), generate(True)()
    same_text = sum(x == y for x, y in zip(a, b))
    bench.results.update(tokens=tokens, times=times, max_abs_logit_diff=same_logits, same_text=same_text,
                         n_generate=len(held_out))
    for kind in ("forward", "generate"):
        r = times[f"{kind}_grouped"]["median"] / times[f"{kind}_given"]["median"]
        bench.results[f"ratio_{kind}"] = r
        bench.log(f"{kind}: given {times[f'{kind}_given']['median']:.1f} s, grouped "
                  f"{times[f'{kind}_grouped']['median']:.1f} s ({r:.2f}×)")
    bench.add(f"padded prompt tokens, {len(prompts)} prompts in batches of {batch}: given order / grouped",
              f"{tokens['given']['padded']} / {tokens['grouped']['padded']} (real {tokens['given']['real']})")
    bench.add("prompt pass time: grouped / given", bench.results["ratio_forward"], "×")
    bench.add(f"generation of {new_tokens} tokens, {len(held_out)} prompts: grouped / given",
              bench.results["ratio_generate"], "×")
    bench.add("same greedy text (grouped vs given)", f"{same_text}/{len(held_out)}")
    bench.add("max last-position logit difference", same_logits)
    bench.write()


if __name__ == "__main__":
    main()
