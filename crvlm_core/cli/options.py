"""The ``crvlm`` sub-commands' options, one function per sub-command (and per option group of ``fit``), and the
parsing of option values (``--layers``, subject lists) the sub-commands share. Option names are contracts."""

from __future__ import annotations

import argparse

__all__ = ["add_eval_options", "add_fit_options", "add_serve_options", "parse_layers", "subjects"]


def parse_layers(text: str | None) -> list[int] | None:
    """``"8"`` → [8]; ``"6-10"`` → [6..10]; ``"4,8,12"`` → [4, 8, 12]; None → None (method default)."""
    if text is None or text == "":
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                layers += list(range(lo, hi + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise SystemExit(f"crvlm: bad --layers {text!r}: use N, A-B or A,B,C") from None
    return layers


def subjects(text: str | None) -> list[str]:
    """``"a, b"`` → ``["a", "b"]`` (blank entries dropped)."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _add_baseline_options(f: argparse.ArgumentParser) -> None:
    g = f.add_argument_group("baselines (--method system-prompt, persona, actadd, cast, lora)")
    g.add_argument("--condition-layers", default=None, help="cast: candidate condition layers (default: all but 0)")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-steps", type=int, default=48, help="lora: optimiser steps of batch 4")
    g.add_argument("--lora-lr", type=float, default=5e-4)


def _add_crvlm_options(f: argparse.ArgumentParser) -> None:
    c = f.add_argument_group("CR-VLM calibrator (--method crvlm)")
    c.add_argument("--gate-layer", default="auto", help="prefill gate layer: auto (90%% depth), none (the paper's "
                   "gate on the steered layer's own state) or a layer number")
    c.add_argument("--target-scale", type=float, default=1.0, help="λ of the out-of-scope target h + λ·s")
    c.add_argument("--epochs", type=int, default=40)
    c.add_argument("--width", type=int, default=1024)
    c.add_argument("--lr", type=float, default=3e-4)
    c.add_argument("--train-positions", choices=["tokens", "last"], default="tokens",
                   help="train on sampled prompt-token states (default) or only the last prompt token (the paper)")
    c.add_argument("--behavioural-epochs", type=int, default=1, help="then fine-tune on the refusal's cross-entropy "
                   "out of scope and KL in scope (default 1 epoch; 0: off)")


def _add_refusal_steering_options(f: argparse.ArgumentParser) -> None:
    r = f.add_argument_group("Refusal Steering (--remove; --train defaults to refusal-topics)")
    r.add_argument("--remove", default=None, help="subject whose refusals to remove (e.g. political)")
    r.add_argument("--keep", default="harmful", help="subject whose refusals to keep")
    r.add_argument("--neutral", default="neutral", help="subject answered before and after (KL, compliant side)")
    r.add_argument("--k", type=int, default=3, help="sampled responses per prompt scored by the judge")
    r.add_argument("--tau", type=float, default=0.5, help="keep prompts with |judge confidence| >= tau")
    r.add_argument("--score-judge", default="learned", choices=["keyword", "learned", "llm"])
    r.add_argument("--n-layers-steer", type=int, default=3)
    r.add_argument("--operation", choices=["subtract", "project_out"], default="subtract")
    r.add_argument("--search-by", choices=["score", "generate"], default="generate",
                   help="α search on judged generations (default) or on the first-token refusal score (~10× "
                        "cheaper, but its log-odds > 0 rule missed Qwen's refusals: see the README)")
    r.add_argument("--gate", action="store_true",
                   help="steer only prompts a topic gate (--remove vs --keep) selects, so kept refusals stay")
    r.add_argument("--ridge-lambda-rel", type=float, default=None,
                   help="rmd/wrmd: λ as a multiple of tr(Σ)/d (default: chosen by cross-fitting)")
    r.add_argument("--n-val", type=int, default=12, help="validation prompts per subject (α search)")
    r.add_argument("--n-holdout", type=int, default=24, help="held-out test prompts per subject (never fitted on)")


def add_fit_options(f: argparse.ArgumentParser, default_model: str, methods: list[str]) -> None:
    """``crvlm fit``: the model, method and data, then the option groups of each method family."""
    f.add_argument("--model", default=default_model, help=f"model spec (default {default_model}; see `crvlm models`)")
    f.add_argument("--method", default="teacher-forced", choices=methods,
                   help="a refusal-vector method, or crvlm (teacher-forced vector + calibrator); with --remove: "
                        "mean-diff, rmd or wrmd (Refusal Steering)")
    f.add_argument("--train", default="mmlu", help="bundled dataset name or a JSONL file")
    f.add_argument("--in-scope", default=None, help="subjects the model should answer, comma separated")
    f.add_argument("--policy", default=None, help="a policy YAML (several constraints): fit what it needs")
    f.add_argument("--design", choices=["composed", "union"], default=None,
                   help="policy design (default: the file's fit.design, else composed)")
    f.add_argument("--out-scope", default=None, help="subjects to refuse (default: every other subject)")
    f.add_argument("--layers", default=None, help="N, A-B or A,B,C (default: a third of the way up)")
    f.add_argument("--alpha", type=float, default=1.0, help="steering strength saved with the vector")
    f.add_argument("--ridge-lambda", type=float, default=1.0)
    f.add_argument("--refusal-prefix", default=None, help='teacher-forcing refusal prefix (default "Sorry")')
    f.add_argument("--compliant-prefix", default=None, help='same-length compliant prefix (default "Sure")')
    _add_baseline_options(f)
    _add_crvlm_options(f)
    _add_refusal_steering_options(f)
    f.add_argument("--n-train", type=int, default=200, help="training samples per scope (paper: 200)")
    f.add_argument("--split", choices=["train", "test", "all"], default="train")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--out", required=True, help="artifact folder to write (must be absent or empty)")
    f.add_argument("--force", action="store_true", help="replace an existing --out folder whole once the fit is done")


def add_eval_options(e: argparse.ArgumentParser, default_judge: str) -> None:
    """``crvlm eval``: what to evaluate (an artifact, a policy or a bare model), on which data, judged how."""
    e.add_argument("--artifact", default=None, help="a `crvlm fit` output folder")
    e.add_argument("--policy", default=None, help="a policy YAML: R / ORR / MB per constraint and jointly")
    e.add_argument("--model", default=None, help="model spec (unsteered when no --artifact)")
    e.add_argument("--test", default=None, help="bundled dataset name or a JSONL file (default: the artifact's "
                   "training data, else mmlu)")
    e.add_argument("--in-scope", default=None)
    e.add_argument("--out-scope", default=None)
    e.add_argument("--layers", default=None, help="override the artifact's layers")
    e.add_argument("--alpha", type=float, default=None, help="override the artifact's strength")
    e.add_argument("--n-test", type=int, default=200, help="test samples per scope (paper: 200)")
    e.add_argument("--split", choices=["train", "test", "all"], default="test")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=24)
    e.add_argument("--judge", default=default_judge, choices=["keyword", "learned", "llm"],
                   help=f"refusal judge (default {default_judge}: the best offline judge against the human labels; "
                        "keyword: the documented phrase rule); metrics.json records its validation accuracy and κ")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--out", required=True)


def add_serve_options(s: argparse.ArgumentParser, default_model: str) -> None:
    """``crvlm serve``: the model and its steered variant, the address, the request limits and batching."""
    s.add_argument("--model", default=None, help=f"model spec (default: the artifact's, else {default_model})")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--artifact", default=None, help="a `crvlm fit` output folder (vector, calibrator or policy)")
    src.add_argument("--policy", default=None, help="a policy YAML fitted with `crvlm fit --policy` (its artifact)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=int, default=2048, help="largest prompt (tokens) a request may send")
    s.add_argument("--batch-size", type=int, default=8, help="requests generated together at most")
    s.add_argument("--batch-window-ms", type=float, default=10.0, help="wait this long to gather a batch")
