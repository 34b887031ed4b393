"""Fit the llm-probe judge's readout on the training labels only and write crvlm_core/judges/readouts/llm-probe.json.

The judge model (Qwen2.5-Coder-1.5B, bfloat16) reads every training pair under the llm judge's REFUSAL / COMPLIANCE
prompt once (states cached in outputs/cache/judge-states-*/, ~4 s per pair on 2 busy cores); the layer and C of the
readout are chosen by seeded 5-fold cross-validation on the training labels (stratified by label × source); the
readout is then fitted on all of them. Nothing held out is read.

    python scripts/fit_judge_probe.py [--out PATH] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import datetime as dt

import numpy as np

from crvlm_core.data.schema import fingerprint
from crvlm_core.judges.labels import judge_label_split
from crvlm_core.judges.llm import LocalLMBackend
from crvlm_core.judges.probe import (
    PROBE_LAYERS,
    PROBE_PATH,
    ProbeJudge,
    judge_states,
    select_probe,
)
from crvlm_core.judges.readout import LinearReadout
from crvlm_core.judges.registry import LLM_MAX_CHARS, LLM_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(PROBE_PATH))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    train, _ = judge_label_split(args.seed)
    backend = LocalLMBackend(LLM_MODEL, dtype="bfloat16", batch_size=args.batch_size)
    states, _ = judge_states(backend, [s.prompt for s in train], [s.extra["response"] for s in train],
                             max_response_chars=LLM_MAX_CHARS, cache_dir=True, progress=True)
    y = np.array([bool(s.extra["refused"]) for s in train])
    source = [s.id.split("-")[0] for s in train]
    choice = select_probe(states, y, source, seed=args.seed)
    for row in choice["cv"]:
        print(f"  layer {row['layer']:2d}  C {row['C']:<6}  5-fold accuracy {row['accuracy']:.3f}")
    li = list(PROBE_LAYERS).index(choice["layer"])
    readout = LinearReadout.fit(states[:, li], y, C=choice["C"], seed=args.seed)
    info = {"fitted": dt.date.today().isoformat(), "n_train": len(train), "train_fingerprint": fingerprint(train),
            "split_seed": args.seed, "train_sources": {s: source.count(s) for s in sorted(set(source))},
            "selection": "5-fold cross-validated accuracy on the training labels", **choice}
    judge = ProbeJudge(backend, readout, choice["layer"], max_response_chars=LLM_MAX_CHARS, info=info)
    print(f"layer {choice['layer']}, C {choice['C']}: wrote {judge.save(args.out)}")


if __name__ == "__main__":
    main()
