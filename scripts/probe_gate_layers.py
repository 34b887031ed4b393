"""Where a prefill gate could read the scope: held-out accuracy of a logistic probe (in vs out of scope) on notebook
02's split, per layer, for three summaries of the prompt — the last token, the mean over all prompt tokens and the
mean over the question's own tokens (chat template left out). Issue #23 asked whether the gate could move to a layer
at or below the steered one, where it would fit in the steered prompt pass; this is the measurement behind "no"
(docs/results.md, "One prompt pass for the prefill gate").

Prints one line per (summary, layer). Heavy (one forward over 300 prompts); run alone:

    .venv/bin/python scripts/probe_gate_layers.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import nnsight
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crvlm_core.data.bundled import load_dataset  # noqa: E402
from crvlm_core.data.splits import assign_scope, split  # noqa: E402
from crvlm_core.extract import prompt_batches  # noqa: E402
from crvlm_core.models.loading import load_model  # noqa: E402

LAYERS = [2, 4, 6, 8, 12, 16, 22]
SUFFIX = 5  # "<|im_end|>\n<|im_start|>assistant\n" after the question in Qwen's template


def summaries(m, samples, prefix: int) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros(len(samples), len(LAYERS), m.hidden_size) for k in ("last", "mean", "question-mean")}
    prompts = [s.prompt for s in samples]
    for _, idx in prompt_batches(m, prompts, [False] * len(prompts), 8):
        enc = m.build_inputs([prompts[k] for k in idx])
        am = enc["attention_mask"].float()
        qm = am.clone()
        for r in range(len(idx)):
            start = am.shape[1] - int(am[r].sum())
            qm[r, :start + prefix] = 0
            qm[r, -SUFFIX:] = 0
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with m.model.trace(enc) as tracer:
                hs = nnsight.save([m.layers[i].output.detach().cpu() for i in LAYERS])
                tracer.stop()
        for j, h in enumerate(hs):
            h = h.float()
            out["last"][idx, j] = h[:, -1]
            out["mean"][idx, j] = (h * am[..., None]).sum(1) / am.sum(1, keepdim=True)
            out["question-mean"][idx, j] = (h * qm[..., None]).sum(1) / qm.sum(1, keepdim=True)
    return out


def main() -> int:
    torch.manual_seed(0)
    m = load_model("qwen2.5-0.5b")
    train, test = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=100, n_test=50, seed=42)
    prefix = m.build_inputs([""])["input_ids"].shape[1] - SUFFIX  # template tokens before the question
    f_train, f_test = summaries(m, train, prefix), summaries(m, test, prefix)
    y_train = [s.scope == "out" for s in train]
    y_test = [s.scope == "out" for s in test]
    for kind in f_train:
        for j, layer in enumerate(LAYERS):
            x_train, x_test = f_train[kind][:, j].numpy(), f_test[kind][:, j].numpy()
            mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
            clf = LogisticRegression(C=0.1, max_iter=2000).fit((x_train - mu) / sd, y_train)
            print(f"{kind:14s} layer {layer:2d}  held-out accuracy {clf.score((x_test - mu) / sd, y_test):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
