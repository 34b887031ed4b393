"""The ``crvlm`` command: ``fit`` a refusal vector, ``eval`` a (steered) model, run the ``workbook``, list ``models``
and ``datasets``. Option names and output keys here are contracts other work relies on: extend, don't rename."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["main", "parse_layers", "build_parser"]

FIT_JSON = "fit.json"
METRICS_JSON = "metrics.json"
SAMPLES_JSONL = "samples.jsonl"


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


def _subjects(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _scoped_split(source: str, in_scope: list[str], out_scope: list[str], part: str, n: int | None, seed: int):
    from crvlm_core.data.samples import assign_scope, load_dataset, split, take_per_scope

    samples = load_dataset(source)
    if in_scope or out_scope:
        samples = assign_scope(samples, in_scope=in_scope, out_scope=out_scope or None)
    if part == "all":
        return samples[:] if n is None else take_per_scope(samples, n)
    train, test = split(samples, n_train=None, n_test=None, test_fraction=0.5, seed=seed)
    chosen = train if part == "train" else test
    return chosen if n is None else take_per_scope(chosen, n)


def _write_outputs(out: Path, metrics: dict, rows: list[dict]) -> None:
    from crvlm_core.core.io import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / METRICS_JSON, metrics)
    atomic_write_bytes(out / SAMPLES_JSONL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def cmd_fit(args: argparse.Namespace) -> int:
    from crvlm_core.core.io import atomic_write_json
    from crvlm_core.models.loading import load_model

    if args.policy:
        from crvlm_core.methods.policies.policies import cmd_fit_policy

        return cmd_fit_policy(args)
    if getattr(args, "remove", None):  # Refusal Steering: remove one topic's refusals, keep another's
        from crvlm_core.methods.refusal_steering.pipeline import cli_fit

        return cli_fit(args)
    in_scope, out_scope = _subjects(args.in_scope), _subjects(args.out_scope)
    if not in_scope:
        raise SystemExit("crvlm fit: --in-scope needs at least one subject (empty scope), or give --policy FILE")
    train = _scoped_split(args.train, in_scope, out_scope, args.split, args.n_train, args.seed)
    handle = load_model(args.model)
    out = Path(args.out)
    start = time.perf_counter()
    layers = parse_layers(args.layers)
    if args.method == "crvlm":
        from crvlm_core.methods.crvlm.steering import finetune_behavioural, fit_crvlm

        gate = {"auto": "auto", "none": None}.get(args.gate_layer, None)
        if args.gate_layer not in ("auto", "none"):
            gate = int(args.gate_layer)
        steering = fit_crvlm(handle, train, layers=layers, gate_layer=gate, target_scale=args.target_scale,
                             width=args.width, epochs=args.epochs, lr=args.lr, seed=args.seed, out_dir=out,
                             train_positions=args.train_positions)
        if args.behavioural_epochs > 0:
            finetune_behavioural(steering, handle, train, epochs=args.behavioural_epochs, seed=args.seed)
        steering.save(out)
        layers_done, alpha, fingerprint = list(steering.layers), args.target_scale, steering.info["vector_fingerprint"]
        extra = {"gate_layer": steering.gate_layer, "epochs": args.epochs, "width": args.width,
                 "train_positions": args.train_positions, "behavioural_epochs": args.behavioural_epochs,
                 "final_losses": steering.info["final_losses"]}
    elif args.method in _baselines():
        from crvlm_core.methods.baselines.baselines import fit_baseline

        b = fit_baseline(handle, train, args.method, out, in_scope=in_scope, layers=layers, alpha=args.alpha,
                         condition_layers=parse_layers(args.condition_layers), lora_rank=args.lora_rank,
                         lora_steps=args.lora_steps, lora_lr=args.lora_lr, batch_size=args.batch_size, seed=args.seed)
        layers_done, alpha = b.info.get("layers", []), b.info.get("alpha", 0.0)
        fingerprint = b.info.get("fingerprint") or b.handle.spec
        extra = {k: v for k, v in b.info.items() if k in ("system", "condition_layer", "threshold", "rank", "steps",
                                                          "final_loss", "lora_layers")}
    else:
        from crvlm_core.methods.refusal_vectors import fit_vector

        vector = fit_vector(handle, train, args.method, layers=layers, alpha=args.alpha,
                            ridge_lambda=args.ridge_lambda, refusal_prefix=args.refusal_prefix,
                            compliant_prefix=args.compliant_prefix, batch_size=args.batch_size)
        vector.save(out)
        layers_done, alpha, fingerprint, extra = vector.layers, vector.alpha, vector.fingerprint, {}
    seconds = time.perf_counter() - start
    summary = {
        "model": args.model, "method": args.method, "layers": layers_done, "alpha": alpha,
        "in_scope": in_scope, "out_scope": out_scope, "train": args.train, "split": args.split, "seed": args.seed,
        "n_in": sum(s.scope == "in" for s in train), "n_out": sum(s.scope == "out" for s in train),
        "fit_seconds": seconds, "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra,
    }
    atomic_write_json(out / FIT_JSON, summary)
    print(f"[fit] {args.method} on {args.model}: layers {layers_done}, {summary['n_out']} out / {summary['n_in']} in "
          f"training samples, {seconds:.1f} s → {out}")
    return 0


def load_interventions(artifact: Path, handle, alpha: float | None = None, layers: list[int] | None = None) -> list:
    """The interventions a `crvlm fit` folder describes (a vector, or a CR-VLM calibrator), checked against
    the model."""
    fit = json.loads((artifact / FIT_JSON).read_text())
    if fit.get("method") == "policy":
        from crvlm_core.methods.policies.policies import load_policy_steering

        return [load_policy_steering(artifact, handle)]
    if fit.get("method") in _baselines():
        from crvlm_core.methods.baselines.baselines import load_baseline

        b = load_baseline(artifact, handle, alpha, layers)
        if b.handle is not handle or b.system:
            raise SystemExit(f"the {b.method} baseline is not an intervention (a system prompt or adapted weights): "
                             "evaluate it with `crvlm eval --artifact`")
        return b.interventions
    if fit.get("method") == "crvlm":
        from crvlm_core.methods.crvlm.steering import load_calibrated

        steering = load_calibrated(artifact)
        if layers is not None or alpha is not None:
            raise SystemExit("crvlm eval: --layers/--alpha do not apply to a CR-VLM calibrator")
        steering.validate(handle)
        return [steering]
    from crvlm_core.methods.refusal_steering.pipeline import interventions_of
    from crvlm_core.vectors.estimators import SteeringVector

    vector = SteeringVector.load(artifact)
    vector.check_compatible(handle.n_layers, handle.hidden_size)
    return interventions_of(vector, alpha=alpha, layers=layers)


def _baselines() -> dict:
    from crvlm_core.methods.baselines.baselines import BASELINES

    return BASELINES


def cmd_eval(args: argparse.Namespace) -> int:
    from crvlm_core.models.loading import load_model
    from crvlm_core.methods.refusal_vectors import evaluate

    fit: dict = {}
    interventions = []
    from crvlm_core.methods.policies.policies import cmd_eval_policy, is_policy_artifact

    if args.policy or is_policy_artifact(args.artifact):
        return cmd_eval_policy(args)
    if args.artifact:
        art = Path(args.artifact)
        if not (art / FIT_JSON).exists():
            raise SystemExit(f"crvlm eval: {art} has no {FIT_JSON}: not a `crvlm fit` output folder")
        fit = json.loads((art / FIT_JSON).read_text())
    args.test = args.test or fit.get("train") or "mmlu"  # default: the data the artifact was fitted on
    if args.artifact:
        if fit.get("kind") == "refusal-steering":
            from crvlm_core.methods.refusal_steering.pipeline import cli_eval

            return cli_eval(args, fit)
    model = args.model or fit.get("model")
    if not model:
        raise SystemExit("crvlm eval: give --artifact DIR or --model SPEC")
    handle = load_model(model)
    system = None
    if args.artifact and fit.get("method") in _baselines():  # a system prompt, adapted weights or interventions
        from crvlm_core.methods.baselines.baselines import load_baseline

        b = load_baseline(Path(args.artifact), handle, args.alpha, parse_layers(args.layers))
        handle, interventions, system = b.handle, b.interventions, b.system
    elif args.artifact:
        interventions = load_interventions(Path(args.artifact), handle, args.alpha, parse_layers(args.layers))
    in_scope = _subjects(args.in_scope) or fit.get("in_scope", [])
    out_scope = _subjects(args.out_scope) or fit.get("out_scope", [])
    if not in_scope:
        raise SystemExit("crvlm eval: --in-scope is needed (or an artifact that records it)")
    seed = args.seed if args.seed is not None else fit.get("seed", 42)
    test = _scoped_split(args.test, in_scope, out_scope, args.split, args.n_test, seed)
    result = evaluate(handle, test, interventions, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      judge=args.judge, system=system)
    from crvlm_core.judges.judges import judge_validation

    metrics = {**result.metrics, "judge_validation": judge_validation(args.judge),
               "artifact": str(args.artifact) if args.artifact else None,
               "method": fit.get("method", "unsteered"), "in_scope": in_scope, "test": args.test, "split": args.split,
               "layers": list(interventions[0].layers) if interventions else [],
               "alpha": getattr(interventions[0], "alpha", fit.get("alpha")) if interventions else 0.0}
    _write_outputs(Path(args.out), metrics, result.rows)
    print(f"[eval] {metrics['method']} on {model}: R={metrics['refusal_rate_out']:.3f} "
          f"ORR={metrics['over_refusal_in']:.3f} MB={metrics['mb_score']:.3f} "
          f"(n_out={metrics['n_out']}, n_in={metrics['n_in']}, judge={metrics['judge']}) → {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from crvlm_core.models.loading import DEFAULT_MODEL, list_specs

    for name, desc in list_specs().items():
        print(f"{name:22s} {desc}{'  [default]' if name == DEFAULT_MODEL else ''}")
    print("…or any hub id (owner/name) or local model folder.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from crvlm_core.serve.server import ServeLimits, run_server

    limits = ServeLimits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                         max_batch_size=args.batch_size, batch_window_ms=args.batch_window_ms)
    run_server(args.model, args.artifact, args.policy, args.host, args.port, limits)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from collections import Counter

    from crvlm_core.data.samples import list_datasets, load_dataset

    for name in list_datasets():
        counts = Counter(s.subject for s in load_dataset(name))
        print(f"{name:22s} {sum(counts.values()):5d}  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from crvlm_core.workbook import runner as workbook
    from crvlm_core.judges.judges import DEFAULT_JUDGE
    from crvlm_core.models.loading import DEFAULT_MODEL
    from crvlm_core.methods.refusal_vectors import METHODS

    p = argparse.ArgumentParser(prog="crvlm", description="Configurable refusal by activation steering.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit a refusal vector and save it as an artifact folder")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL}; see `crvlm models`)")
    f.add_argument("--method", default="teacher-forced", choices=list(METHODS) + ["crvlm", "rmd", "wrmd"] + list(_baselines()),
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
    g = f.add_argument_group("baselines (--method system-prompt, persona, actadd, cast, lora)")
    g.add_argument("--condition-layers", default=None, help="cast: candidate condition layers (default: all but 0)")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-steps", type=int, default=48, help="lora: optimiser steps of batch 4")
    g.add_argument("--lora-lr", type=float, default=5e-4)
    c = f.add_argument_group("CR-VLM calibrator (--method crvlm)")
    c.add_argument("--gate-layer", default="auto", help="prefill gate layer: auto (90%% depth), none (the paper's "
                   "gate on the steered layer's own state) or a layer number")
    c.add_argument("--target-scale", type=float, default=1.0, help="λ of the out-of-scope target h + λ·s")
    c.add_argument("--epochs", type=int, default=40)
    c.add_argument("--width", type=int, default=1024)
    c.add_argument("--lr", type=float, default=3e-4)
    c.add_argument("--train-positions", choices=["tokens", "last"], default="tokens",
                   help="train on sampled prompt-token states (default) or only the last prompt token (the paper)")
    c.add_argument("--behavioural-epochs", type=int, default=1,
                   help="then fine-tune on the refusal's cross-entropy out of scope and KL in scope (default 1 epoch; 0: off)")
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
    f.add_argument("--n-train", type=int, default=200, help="training samples per scope (paper: 200)")
    f.add_argument("--split", choices=["train", "test", "all"], default="train")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--out", required=True, help="artifact folder to write")
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("eval", help="generate, judge refusals, write metrics.json and samples.jsonl")
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
    e.add_argument("--judge", default=DEFAULT_JUDGE, choices=["keyword", "learned", "llm"],
                   help=f"refusal judge (default {DEFAULT_JUDGE}: the best offline judge against the human labels; "
                        "keyword: the documented phrase rule); metrics.json records its validation accuracy and κ")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser("workbook", help="run the workbook notebooks headlessly with papermill")
    workbook.add_arguments(w)
    w.set_defaults(func=workbook.run_from_args)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: <spec> unsteered, <spec>:steered with an artifact")
    s.add_argument("--model", default=None, help=f"model spec (default: the artifact's, else {DEFAULT_MODEL})")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--artifact", default=None, help="a `crvlm fit` output folder (vector, calibrator or policy)")
    src.add_argument("--policy", default=None, help="a policy YAML fitted with `crvlm fit --policy` (its artifact)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=int, default=2048, help="largest prompt (tokens) a request may send")
    s.add_argument("--batch-size", type=int, default=8, help="requests generated together at most")
    s.add_argument("--batch-window-ms", type=float, default=10.0, help="wait this long to gather a batch")
    s.set_defaults(func=cmd_serve)

    sub.add_parser("models", help="list the named model specs").set_defaults(func=cmd_models)
    sub.add_parser("datasets", help="list the bundled datasets").set_defaults(func=cmd_datasets)
    return p


def main(argv: list[str] | None = None) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        from crvlm_core.data.samples import DataError
        from crvlm_core.models.loading import ModelLoadError

        if isinstance(err, (DataError, ModelLoadError, ValueError, FileNotFoundError)):
            print(f"crvlm {args.command}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    raise SystemExit(code or 0)


if __name__ == "__main__":
    main()
