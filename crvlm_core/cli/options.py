"""The ``crvlm`` sub-commands' options, one function per sub-command (and per option group of ``fit``), and the
parsing of option values (``--layers``, subject lists) the sub-commands share. Option names are contracts.

Every value is checked by argparse as it is read (finite floats, positive counts, layer lists, ``--gate-layer``), so a
bad option stops the command with one line and exit 2 before any data or model is loaded."""

from __future__ import annotations

import argparse
import math
import sys

from crvlm_core.cli.placement import add_placement_options
from crvlm_core.core.errors import InputError

__all__ = ["Parser", "add_eval_options", "add_fit_options", "add_serve_options", "finite", "gate_layer",
           "layers_option", "parse_layers", "positive", "subjects"]


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``crvlm fit: error: argument --alpha: …``) and exit 2, without
    the usage block (``--help`` shows it)."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        print(f"{self.prog}: error: {message}".splitlines()[0], file=sys.stderr)
        raise SystemExit(2)


def finite(low: float | None = None, above: bool = False):
    """An argparse type: a finite float (no inf / nan), at least ``low`` (strictly above it when ``above``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, got {text!r}")
        return value
    parse.__name__ = "finite float"
    return parse


def positive(low: int = 1):
    """An argparse type: an integer ``>= low`` (1: a count; 0: a count where 0 means off)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def parse_layers(text: str | None, option: str = "--layers") -> list[int] | None:
    """``"8"`` → [8]; ``"6-10"`` → [6..10]; ``"4,8,12"`` → [4, 8, 12]; None → None (method default).

    Raises:
        InputError: bad syntax or a negative layer (layers count from 0; nothing wraps to the last layer).
    """
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
        raise InputError(f"bad {option} {text!r}: use N, A-B or A,B,C (layer numbers from 0)") from None
    if any(layer < 0 for layer in layers):
        raise InputError(f"bad {option} {text!r}: layers are numbered from 0 (a negative layer is not the last one)")
    return layers


def layers_option(option: str):
    """An argparse type checking a layer list (:func:`parse_layers`); the text is kept, parsed again where used."""
    def parse(text: str) -> str:
        try:
            parse_layers(text, option)
        except InputError as err:
            raise argparse.ArgumentTypeError(str(err).replace(f"bad {option} ", "bad value ")) from None
        return text
    parse.__name__ = "layers"
    return parse


def gate_layer(text: str) -> str:
    """An argparse type for ``--gate-layer``: ``auto``, ``none`` or a layer number >= 0 (kept as text)."""
    if text in ("auto", "none") or (text.isdigit() and text.isascii()):
        return text
    raise argparse.ArgumentTypeError(f"use auto, none or a layer number >= 0, got {text!r}")


def subjects(text: str | None) -> list[str]:
    """``"a, b"`` → ``["a", "b"]`` (blank entries dropped)."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


_SPLIT_HELP = ("which part of the data: train / test (the seeded 50/50 halves of one dataset), all; default: auto — "
               "%s")
_POS, _COUNT0 = positive(1), positive(0)


def _add_baseline_options(f: argparse.ArgumentParser) -> None:
    g = f.add_argument_group("baselines (--method system-prompt, persona, actadd, cast, lora)")
    g.add_argument("--condition-layers", type=layers_option("--condition-layers"), default=None,
                   help="cast: candidate condition layers (default: all but 0)")
    g.add_argument("--lora-rank", type=_POS, default=8)
    g.add_argument("--lora-steps", type=_POS, default=48, help="lora: optimiser steps of batch 4")
    g.add_argument("--lora-lr", type=finite(0.0, above=True), default=5e-4)


def _add_crvlm_options(f: argparse.ArgumentParser) -> None:
    c = f.add_argument_group("CR-VLM calibrator (--method crvlm)")
    c.add_argument("--gate-layer", type=gate_layer, default="auto", help="prefill gate layer: auto (90%% depth), "
                   "none (the paper's gate on the steered layer's own state) or a layer number")
    c.add_argument("--gate-pass", choices=["shared", "separate"], default=None,
                   help="crvlm and cast: read the prefill gate in the one prompt pass and steer from the prompt's "
                   "last token on (shared: plain generation speed; crvlm's default) or in an extra pass, steering "
                   "every prompt token (separate; cast's default)")
    c.add_argument("--target-scale", type=finite(), default=1.0, help="λ of the out-of-scope target h + λ·s")
    c.add_argument("--w-vision", type=finite(0.0), default=1.0, help="weight of L_vision, the pull of the predicted "
                   "shift towards the vision-only counterfactual shift (on a VLM with out-of-scope pictures; 0: off)")
    c.add_argument("--epochs", type=_POS, default=40)
    c.add_argument("--width", type=_POS, default=1024)
    c.add_argument("--lr", type=finite(0.0, above=True), default=3e-4)
    c.add_argument("--train-positions", choices=["tokens", "last"], default="tokens",
                   help="train on sampled prompt-token states (default) or only the last prompt token (the paper)")
    c.add_argument("--framing-augment", type=_COUNT0, default=0, help="copies of each training question dressed "
                   "in misleading framing (training templates) added to the training data (#25; default 0)")
    c.add_argument("--gate-hidden", type=_COUNT0, default=0, help="width of a one-hidden-layer prefill gate (#25; "
                   "default 0: the paper's linear gate)")
    c.add_argument("--gate-fit", choices=["joint", "probe"], default="joint", help="fit the prefill gate with the "
                   "flow network (joint, the paper) or alone first as a logistic probe on standardised states, then "
                   "frozen (probe; #25)")
    c.add_argument("--gate-extra-layers", type=layers_option("--gate-extra-layers"), default=None,
                   help="more layers the prefill gate reads: its input is the last prompt token's state at the gate "
                   "layer and at these, concatenated (N, A-B or A,B,C; #25; default: the gate layer alone)")
    c.add_argument("--hard-gate", action="store_true", help="round the prefill gate's value to 0 or 1 at 0.5: "
                   "in-scope prompts are left exactly alone, out-of-scope ones get the whole update (#25; default: "
                   "the update scaled by the gate value, as in the paper)")
    c.add_argument("--in-scope-push", type=finite(0.0), default=0.0, metavar="BETA",
                   help="where the prefill gate reads in scope, steer by -BETA x the refusal vector: removes the "
                   "model's own refusals of in-scope questions (#25; default 0: in-scope states left alone, as in "
                   "the paper; measured on Qwen2.5-0.5B it changed most in-scope answers for little gain, "
                   "docs/results.md)")
    c.add_argument("--behavioural-epochs", type=_COUNT0, default=1, help="then fine-tune on the refusal's "
                   "cross-entropy out of scope and KL in scope (default 1 epoch; 0: off)")
    c.add_argument("--behavioural-n", type=_POS, default=None, help="the behavioural stage sees at most this many "
                   "training questions per scope, a seeded subset (default: all; its cost grows with the larger "
                   "scope, ~9 s per 4 questions on 2 CPU cores)")
    c.add_argument("--behavioural-lr", type=finite(0.0, above=True), default=1e-4, help="the behavioural stage's "
                   "Adam learning rate (default 1e-4; image-scoped flags on llava-dinov2-qwen2.5-0.5b refused most "
                   "at 3e-4, docs/results.md)")


def _add_refusal_steering_options(f: argparse.ArgumentParser) -> None:
    r = f.add_argument_group("Refusal Steering (--remove; --train defaults to refusal-topics)")
    r.add_argument("--remove", default=None, help="subject whose refusals to remove (e.g. political)")
    r.add_argument("--keep", default="harmful", help="subject whose refusals to keep")
    r.add_argument("--neutral", default="neutral", help="subject answered before and after (KL, compliant side)")
    r.add_argument("--k", type=_POS, default=3, help="sampled responses per prompt scored by the judge")
    r.add_argument("--tau", type=finite(0.0), default=0.5, help="keep prompts with |judge confidence| >= tau")
    r.add_argument("--score-judge", default="learned", choices=["keyword", "learned", "llm"])
    r.add_argument("--n-layers-steer", type=_POS, default=3)
    r.add_argument("--operation", choices=["subtract", "project_out"], default="subtract")
    r.add_argument("--search-by", choices=["score", "generate"], default="generate",
                   help="α search on judged generations (default) or on the first-token refusal score (~10× "
                        "cheaper, but its log-odds > 0 rule missed Qwen's refusals: see the README)")
    r.add_argument("--gate", action="store_true",
                   help="steer only prompts a topic gate (--remove vs --keep) selects, so kept refusals stay")
    r.add_argument("--ridge-lambda-rel", type=finite(0.0, above=True), default=None,
                   help="rmd/wrmd: λ as a multiple of tr(Σ)/d (default: chosen by cross-fitting)")
    r.add_argument("--n-val", type=_COUNT0, default=12, help="validation prompts per subject (α search)")
    r.add_argument("--n-holdout", type=_POS, default=24, help="held-out test prompts per subject (never fitted on)")


def add_fit_options(f: argparse.ArgumentParser, default_model: str, methods: list[str]) -> None:
    """``crvlm fit``: the model, method and data, then the option groups of each method family."""
    f.add_argument("--model", default=default_model, help=f"model spec (default {default_model}; see `crvlm models`)")
    f.add_argument("--method", default="teacher-forced", choices=methods,
                   help="a refusal-vector method, or crvlm (teacher-forced vector + calibrator); with --remove: "
                        "mean-diff, rmd or wrmd (Refusal Steering)")
    f.add_argument("--train", default="mmlu", help="bundled dataset name or a JSONL file")
    f.add_argument("--train-extra", default=None, help="a second bundled dataset or JSONL file whose questions (all "
                   "of them, at most --n-train-extra per scope) join the training data, scoped by the same subjects: "
                   "e.g. plain_questions_train, short questions in another style than MMLU's (#25)")
    f.add_argument("--n-train-extra", type=_POS, default=None, help="at most this many --train-extra questions per "
                   "scope (default: --n-train)")
    f.add_argument("--in-scope", default=None, help="subjects the model should answer, comma separated")
    f.add_argument("--policy", default=None, help="a policy YAML (several constraints): fit what it needs")
    f.add_argument("--design", choices=["composed", "union"], default=None,
                   help="policy design (default: the file's fit.design, else composed)")
    f.add_argument("--out-scope", default=None, help="subjects to refuse (default: every other subject)")
    f.add_argument("--layers", type=layers_option("--layers"), default=None,
                   help="N, A-B or A,B,C, numbered from 0 (default: a third of the way up)")
    f.add_argument("--alpha", type=finite(), default=1.0, help="steering strength saved with the vector")
    f.add_argument("--ridge-lambda", type=finite(0.0), default=1.0)
    f.add_argument("--refusal-prefix", default=None, help='teacher-forcing refusal prefix (default "Sorry")')
    f.add_argument("--compliant-prefix", default=None, help='same-length compliant prefix (default "Sure")')
    _add_baseline_options(f)
    _add_crvlm_options(f)
    _add_refusal_steering_options(f)
    f.add_argument("--n-train", type=_POS, default=200, help="training samples per scope at most (paper: 200)")
    f.add_argument("--split", choices=["train", "test", "all"], default=None, help=_SPLIT_HELP % (
        "the train half of a bundled dataset (eval's default is its test half), all of a JSONL file of your own"))
    f.add_argument("--max-prompt-tokens", type=_POS, default=None,
                   help="refuse prompts longer than this many tokens (default: the model's context length)")
    f.add_argument("--seed", type=_COUNT0, default=42)
    f.add_argument("--batch-size", type=_POS, default=8)
    f.add_argument("--out", required=True, help="artifact folder to write (must be absent or empty)")
    f.add_argument("--force", action="store_true", help="replace an existing --out folder whole once the fit is done")
    add_placement_options(f)


def add_eval_options(e: argparse.ArgumentParser, default_judge: str, judges: tuple[str, ...]) -> None:
    """``crvlm eval``: what to evaluate (an artifact, a policy or a bare model), on which data, judged how."""
    e.add_argument("--artifact", default=None, help="a `crvlm fit` output folder")
    e.add_argument("--policy", default=None, help="a policy YAML: R / ORR / MB per constraint and jointly")
    e.add_argument("--model", default=None, help="model spec (unsteered when no --artifact)")
    e.add_argument("--test", default=None, help="bundled dataset name or a JSONL file (default: the artifact's "
                   "training data, else mmlu)")
    e.add_argument("--in-scope", default=None)
    e.add_argument("--out-scope", default=None)
    e.add_argument("--layers", type=layers_option("--layers"), default=None, help="override the artifact's layers")
    e.add_argument("--alpha", type=finite(), default=None, help="override the artifact's strength")
    e.add_argument("--n-test", type=_POS, default=200, help="test samples per scope at most (paper: 200)")
    e.add_argument("--split", choices=["train", "test", "all"], default=None, help=_SPLIT_HELP % (
        "the test half when --test is the dataset the artifact was fitted on with its train half (or a bundled "
        "dataset, unsteered), else all of --test: data the fit never saw"))
    e.add_argument("--max-prompt-tokens", type=_POS, default=None,
                   help="refuse prompts longer than this many tokens (default: the model's context length)")
    e.add_argument("--seed", type=_COUNT0, default=None)
    e.add_argument("--max-new-tokens", type=_POS, default=24)
    e.add_argument("--judge", default=default_judge, choices=list(judges),
                   help=f"refusal judge (default {default_judge}: the most accurate on the held-out labels, loads "
                        "Qwen2.5-Coder-1.5B; learned: fast; keyword: the documented phrase rule; docs/judges.md); "
                        "metrics.json records its validation accuracy and κ")
    e.add_argument("--batch-size", type=_POS, default=8)
    from crvlm_core.capability import DATASETS

    e.add_argument("--capability", choices=list(DATASETS), default=None,
                   help="also measure multiple-choice accuracy, steered and unsteered, on held-out in-scope and a "
                        "fixed general set of questions (metrics.json `capability`)")
    e.add_argument("--capability-n", type=_POS, default=100, help="questions per capability set (default 100)")
    e.add_argument("--out", required=True, help="folder for metrics.json and samples.jsonl (not a file)")
    add_placement_options(e)


def add_serve_options(s: argparse.ArgumentParser, default_model: str) -> None:
    """``crvlm serve``: the model and its steered variant, the address, the request limits and batching."""
    s.add_argument("--model", default=None, help=f"model spec (default: the artifact's, else {default_model})")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--artifact", default=None, help="a `crvlm fit` output folder (vector, calibrator or policy)")
    src.add_argument("--policy", default=None, help="a policy YAML fitted with `crvlm fit --policy` (its artifact)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_COUNT0, default=8000)
    s.add_argument("--max-tokens-limit", type=_POS, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=_POS, default=2048, help="largest prompt (tokens) a request may send")
    s.add_argument("--batch-size", type=_POS, default=8, help="requests generated together at most")
    s.add_argument("--batch-window-ms", type=finite(0.0), default=10.0, help="wait this long to gather a batch")
    s.add_argument("--engine", choices=["crvlm", "vllm"], default="crvlm",
                   help="crvlm: this package's batcher on transformers (CPU or GPU; streaming, logprobs); vllm: "
                        "vLLM through nnsight, steering installed on the engine (needs vllm and a CUDA GPU)")
    add_placement_options(s, remote=False)
