"""``crvlm fit --remove`` and ``crvlm eval`` of a refusal-steering artifact: options → :class:`FitConfig`, the fit
saved as one artifact folder with its ``fit.json``, and the held-out evaluation → ``metrics.json`` / ``samples.jsonl``."""

from __future__ import annotations

import time
from pathlib import Path

from crvlm_core.cli.inputs import check_layers, deferred_interrupt
from crvlm_core.cli.options import parse_layers
from crvlm_core.core.artifacts import FIT_JSON
from crvlm_core.core.errors import InputError
from crvlm_core.data.limits import check_prompt_lengths
from crvlm_core.data.bundled import load_dataset
from crvlm_core.methods.refusal_steering.directions import METHODS
from crvlm_core.methods.refusal_steering.fit import FitConfig, RefusalSteeringFit, fit_refusal_steering
from crvlm_core.methods.refusal_steering.search import EvalConfig, evaluate_condition, warm_up
from crvlm_core.methods.refusal_steering.topics import DATASET, cap_per_subject, check_topics, topic_splits

__all__ = ["cli_eval", "cli_fit", "fit_config_from_args"]


def fit_config_from_args(args) -> FitConfig:
    """The :class:`FitConfig` of ``crvlm fit --remove`` options (one field per option)."""
    if args.method not in METHODS:
        raise InputError(f"--remove: --method must be one of {', '.join(METHODS)}, got {args.method!r}")
    return FitConfig(method=args.method, remove=args.remove, keep=args.keep, neutral=args.neutral,
                     judge=args.score_judge, k=args.k, tau=args.tau, n_layers_steer=args.n_layers_steer,
                     lam_rel=args.ridge_lambda_rel, operation=args.operation, batch_size=args.batch_size,
                     search_by=args.search_by, gate=bool(args.gate))


def _summary(args, fit: RefusalSteeringFit, seconds: float, model_key: str) -> dict:
    """``fit.json``: the options and what the fit chose (keys kept for older readers)."""
    v = fit.vector
    return {"kind": "refusal-steering", "model": args.model, "method": args.method, "layers": v.layers,
            "alpha": v.alpha, "operation": v.operation, "remove": args.remove, "keep": args.keep,
            "neutral": args.neutral, "in_scope": [args.remove, args.neutral], "out_scope": [args.keep],
            "train": DATASET if args.train in (None, "mmlu") else args.train, "seed": args.seed,
            "n_val": args.n_val, "n_holdout": args.n_holdout, "lambda_rel": v.extra.get("lambda_rel"),
            "n_refuse": v.extra["n_refuse"], "n_comply": v.extra["n_comply"],
            "gate": {k: g for k, g in v.extra["gate"].items() if k != "direction"} if "gate" in v.extra else None,
            "fit_seconds": seconds, "fingerprint": v.fingerprint, "model_key": model_key}


def cli_fit(args) -> int:
    """``crvlm fit --method {mean-diff,rmd,wrmd} --remove TOPIC --keep TOPIC [--train DATA] --out DIR``: fit, choose
    layers / λ / α on the data's train and val splits, save the artifact (vector, gate, settings, ``fit.json``)."""
    from crvlm_core.cli.placement import load_placed, refuse_remote

    refuse_remote(args, "Refusal Steering samples its K answers with transformers' generate on the weights here; "
                  "fit it without --remote ndif", ("ndif",))
    config = fit_config_from_args(args)
    source = DATASET if args.train in (None, "mmlu") else args.train  # mmlu: the scope default
    samples = load_dataset(source)
    try:
        check_topics(samples, args.remove, args.keep, args.neutral)
    except ValueError as err:
        raise InputError(f"--remove/--keep/--neutral: {err} in {source}") from None
    handle = load_placed(args, args.model)
    check_prompt_lengths(handle, samples, args.max_prompt_tokens, source=source)
    warm_up(handle)
    out = Path(args.out)
    start = time.perf_counter()
    splits = topic_splits(samples, n_val=args.n_val, n_test=args.n_holdout, seed=args.seed)
    splits.train = cap_per_subject(splits.train, args.n_train)  # --n-train: prompts per subject scored
    fit = fit_refusal_steering(handle, config, samples, splits)
    summary = _summary(args, fit, time.perf_counter() - start, handle.key)
    fit.save(out, force=bool(getattr(args, "force", False)), extra_json={FIT_JSON: summary})
    v = fit.vector
    print(f"[fit] {args.method} removing {args.remove} refusals (keeping {args.keep}) on {args.model}: layers "
          f"{v.layers}, α {v.alpha:+.2f}, λ/mean-eig {summary['lambda_rel']}, {summary['fit_seconds']:.0f} s → {out}")
    return 0


def _test_split(args, fit: dict) -> list:
    """The held-out prompts of the fit (same seed and sizes), or ``--split train`` / ``all``, capped by ``--n-test``."""
    samples = load_dataset(args.test)
    try:
        check_topics(samples, fit["remove"], fit["keep"], fit["neutral"])
    except ValueError as err:
        raise InputError(f"--test {args.test}: {err} (use --test {DATASET} or a JSONL with these subjects)") from None
    seed = args.seed if args.seed is not None else fit.get("seed", 42)
    args.split = args.split or "test"  # the fit's own held-out prompts
    if args.split == "all":
        test = samples
    else:
        sp = topic_splits(samples, n_val=fit.get("n_val", 12), n_test=fit.get("n_holdout", 24), seed=seed)
        test = sp.test if args.split == "test" else sp.train + sp.val
    return cap_per_subject(test, args.n_test) if args.n_test is not None else test


def cli_eval(args, fit: dict) -> int:
    """``crvlm eval --artifact DIR --test DATA``: unsteered and steered refusal rates per subject on the held-out split
    of the fit (same seed and sizes), KL and unchanged-answer fraction on the neutral prompts → ``metrics.json``."""
    from crvlm_core.core.io import write_run_outputs
    from crvlm_core.cli.placement import load_placed
    from crvlm_core.methods.loading import load_artifact

    test = _test_split(args, fit)
    handle = load_placed(args, args.model or fit["model"])
    check_layers(handle, layers=args.layers)
    check_prompt_lengths(handle, test, args.max_prompt_tokens, source=args.test)
    warm_up(handle)
    ivs = load_artifact(Path(args.artifact), handle, args.alpha, parse_layers(args.layers)).interventions
    config = EvalConfig(judge=args.judge, neutral=fit["neutral"], max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, progress=True)
    base = evaluate_condition(handle, test, (), config)
    steered = evaluate_condition(handle, test, ivs, config, unsteered=base)
    metrics = {"kind": "refusal-steering", "model": handle.spec, "method": fit["method"],
               "artifact": str(args.artifact), "test": args.test, "split": args.split, "judge": args.judge,
               "layers": list(ivs[0].layers), "alpha": getattr(ivs[0], "alpha", None),
               "refusal_rate_by_subject": steered["refusal_rate_by_subject"],
               "unsteered_refusal_rate_by_subject": base["refusal_rate_by_subject"],
               "n_by_subject": steered["n_by_subject"], "kl_neutral": steered["kl_neutral"],
               "unchanged_neutral": steered["unchanged_neutral"], "max_new_tokens": args.max_new_tokens}
    rows = [{"id": s.id, "subject": s.subject, "response": r, "refused": bool(f), "unsteered_response": ru,
             "unsteered_refused": bool(fu)}
            for s, r, f, ru, fu in zip(test, steered["responses"], steered["refused"], base["responses"],
                                       base["refused"])]
    with deferred_interrupt():
        write_run_outputs(Path(args.out), metrics, rows)
    rates = ", ".join(f"{k} {v:.2f} (was {base['refusal_rate_by_subject'][k]:.2f})"
                      for k, v in steered["refusal_rate_by_subject"].items())
    print(f"[eval] {fit['method']} on {handle.spec}: refusals {rates}; KL neutral {steered['kl_neutral']:.3f}, "
          f"unchanged {steered['unchanged_neutral']:.2f} → {args.out}")
    return 0
