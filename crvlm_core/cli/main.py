"""The ``crvlm`` command: ``fit`` a refusal vector, ``eval`` a (steered) model, run the ``workbook``, list ``models``
and ``datasets``. Option names and output keys here are contracts other work relies on: extend, don't rename."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from crvlm_core.cli.inputs import (check_layers, check_out_folder, deferred_interrupt, eval_split,
                                   fit_split, scoped_data)
from crvlm_core.cli.placement import load_placed, placement, refuse_remote
from crvlm_core.cli.options import Parser, add_eval_options, add_fit_options, add_serve_options, parse_layers, subjects
from crvlm_core.core.artifacts import ARTIFACT_JSON, FIT_JSON, ArtifactError, check_writable, read_manifest
from crvlm_core.core.errors import InputError
from crvlm_core.data.limits import check_prompt_lengths

__all__ = ["build_parser", "main"]


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit the chosen method and save it as one artifact folder (``artifact.json``, tensors, ``fit.json``).

    ``--out`` is checked first: a folder that holds anything stops the fit (exit 2) unless ``--force``, which
    replaces it whole once the new artifact is complete. The data and options are checked before the model loads,
    the layers and prompt lengths right after it."""
    check_writable(args.out, args.force)  # before any data or model is loaded
    if args.policy:
        from crvlm_core.cli.policies import cmd_fit_policy

        return cmd_fit_policy(args)
    if getattr(args, "remove", None):  # Refusal Steering: remove one topic's refusals, keep another's
        from crvlm_core.cli.refusal_steering import cli_fit

        return cli_fit(args)
    in_scope, out_scope = subjects(args.in_scope), subjects(args.out_scope)
    if not in_scope:
        raise InputError("--in-scope needs at least one subject (empty scope), or give --policy FILE")
    args.split = fit_split(args.split, args.train)
    train = scoped_data(args.train, in_scope, out_scope, args.split, args.n_train, args.seed, "fit")
    n_main, n_extra = len(train), None
    if args.n_train_extra is not None and not args.train_extra:
        raise InputError("--n-train-extra caps the questions of --train-extra: give --train-extra SOURCE too")
    if args.train_extra:
        n_extra = args.n_train_extra if args.n_train_extra is not None else args.n_train
        train += scoped_data(args.train_extra, in_scope, out_scope, "all", n_extra, args.seed, "fit")
    _refuse_ndif_training(args)
    if args.method == "crvlm" and args.gate_fit == "probe" and (args.gate_layer == "none" or args.gate_hidden):
        raise InputError("--gate-fit probe fits a linear prefill gate: it needs a --gate-layer (not none) and no "
                         "--gate-hidden")
    if args.method == "crvlm" and args.hard_gate and args.gate_layer == "none":
        raise InputError("--hard-gate rounds a prefill gate's value: it needs a --gate-layer (not none)")
    if args.method == "crvlm" and args.in_scope_push and args.gate_layer == "none":
        raise InputError("--in-scope-push acts where a prefill gate reads in scope: it needs a --gate-layer (not none)")
    if args.method == "crvlm" and args.gate_extra_layers and args.gate_layer == "none":
        raise InputError("--gate-extra-layers are read by a prefill gate: it needs a --gate-layer (not none)")
    handle = load_placed(args, args.model)
    check_layers(handle, layers=args.layers, condition_layers=args.condition_layers,
                 gate_layer=args.gate_layer if args.method == "crvlm" else None,
                 gate_extra_layers=args.gate_extra_layers if args.method == "crvlm" else None)
    check_prompt_lengths(handle, train, args.max_prompt_tokens,
                         source=args.train + (f" / {args.train_extra}" if args.train_extra else ""))
    out = Path(args.out)
    start = time.perf_counter()
    artifact, layers_done, alpha, fingerprint, extra = _fit_method(args, handle, train, in_scope, n_main)
    seconds = time.perf_counter() - start
    summary = {
        "model": args.model, "method": args.method, "layers": layers_done, "alpha": alpha,
        "in_scope": in_scope, "out_scope": out_scope, "train": args.train, "split": args.split, "seed": args.seed,
        **({"train_extra": args.train_extra, "n_train_extra": n_extra}
           if args.train_extra else {}),
        "n_in": sum(s.scope == "in" for s in train), "n_out": sum(s.scope == "out" for s in train),
        "fit_seconds": seconds, "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "placement": placement(handle), **extra,
    }
    artifact.save(out, force=args.force, extra_json={FIT_JSON: summary})
    print(f"[fit] {args.method} on {args.model}: layers {layers_done}, {summary['n_out']} out / {summary['n_in']} in "
          f"training samples, {seconds:.1f} s → {out}")
    return 0


def _refuse_ndif_training(args: argparse.Namespace) -> None:
    """Fits that back-propagate through the model need its weights here, not on NDIF."""
    if args.method == "lora":
        refuse_remote(args, "the LoRA baseline trains an adapter on the model's weights here; fit it without "
                      "--remote", ("ndif",))
    if args.method == "crvlm" and args.behavioural_epochs:
        refuse_remote(args, "CR-VLM's behavioural stage back-propagates through the model here; add "
                      "--behavioural-epochs 0", ("ndif",))


def _fit_method(args: argparse.Namespace, handle, train: list, in_scope: list[str], n_main: int) -> tuple:
    """Fit ``args.method``: ``(artifact, layers, alpha, fingerprint, extra fit.json keys)``. ``train[:n_main]`` are
    ``--train``'s questions (the rest ``--train-extra``'s): CR-VLM's refusal vector comes from them alone."""
    layers = parse_layers(args.layers)
    if args.method == "crvlm":
        from crvlm_core.methods.crvlm.config import BehaviouralConfig, CrvlmConfig
        from crvlm_core.methods.crvlm.steering import fit_crvlm

        gate = {"auto": "auto", "none": None}.get(args.gate_layer, None)
        if args.gate_layer not in ("auto", "none"):
            gate = int(args.gate_layer)
        behavioural = BehaviouralConfig(epochs=args.behavioural_epochs, seed=args.seed,
                                        max_per_scope=args.behavioural_n,
                                        lr=args.behavioural_lr) if args.behavioural_epochs > 0 else None
        config = CrvlmConfig(layers=layers, gate_layer=gate, gate_pass=args.gate_pass or "shared",
                             target_scale=args.target_scale, w_vision=args.w_vision,
                             width=args.width, epochs=args.epochs, lr=args.lr, seed=args.seed,
                             train_positions=args.train_positions, behavioural=behavioural,
                             framing_augment=args.framing_augment, gate_hidden=args.gate_hidden,
                             gate_fit=args.gate_fit, hard_gate=args.hard_gate, in_scope_push=args.in_scope_push,
                             gate_extra_layers=parse_layers(args.gate_extra_layers, "--gate-extra-layers") or ())
        # the refusal direction from --train alone (--train-extra only teaches the scope); resume checkpoints in
        # outputs/cache/
        steering = fit_crvlm(handle, train, config, vector_train=train[:n_main], cache_dir=True)
        extra = {"gate_layer": steering.gate_layer, "gate_pass": steering.gate_pass, "epochs": args.epochs,
                 "width": args.width,
                 "train_positions": args.train_positions, "behavioural_epochs": args.behavioural_epochs,
                 "behavioural_n": args.behavioural_n, "behavioural_lr": args.behavioural_lr,
                 "framing_augment": args.framing_augment, "gate_hidden": args.gate_hidden, "gate_fit": args.gate_fit,
                 "hard_gate": args.hard_gate, "gate_extra_layers": list(steering.gate_extra_layers),
                 "in_scope_push": args.in_scope_push, "w_vision": args.w_vision,
                 "vision_loss": steering.info.get("vision_loss"),
                 "final_losses": steering.info["final_losses"]}
        return steering, list(steering.layers), args.target_scale, steering.info["vector_fingerprint"], extra
    if args.method in _baselines():
        from crvlm_core.methods.baselines.config import BaselineConfig
        from crvlm_core.methods.baselines.fit import fit_baseline

        b = fit_baseline(handle, train, BaselineConfig(
            method=args.method, in_scope=in_scope, layers=layers, alpha=args.alpha,
            condition_layers=parse_layers(args.condition_layers, "--condition-layers"), lora_rank=args.lora_rank,
            lora_steps=args.lora_steps, lora_lr=args.lora_lr, batch_size=args.batch_size, seed=args.seed,
            gate_pass=args.gate_pass or "separate"))
        extra = {k: v for k, v in b.info.items() if k in ("system", "condition_layer", "threshold", "gate_pass", "rank",
                                                          "steps", "final_loss", "lora_layers")}
        return b, b.info.get("layers", []), b.info.get("alpha", 0.0), b.info.get("fingerprint") or b.handle.spec, extra
    from crvlm_core.methods.refusal_vectors import VectorConfig, fit_vector

    vector = fit_vector(handle, train, VectorConfig(args.method, layers=layers, alpha=args.alpha,
                        ridge_lambda=args.ridge_lambda, refusal_prefix=args.refusal_prefix,
                        compliant_prefix=args.compliant_prefix, batch_size=args.batch_size))
    return vector, vector.layers, vector.alpha, vector.fingerprint, {}


def _baselines() -> dict:
    from crvlm_core.methods.baselines.config import BASELINES

    return BASELINES


def _fitted(artifact: Path) -> tuple[dict, dict]:
    """``(fit.json or {}, artifact.json)`` of a ``crvlm fit`` folder, after checking every file's hash."""
    if not (artifact / ARTIFACT_JSON).exists() and not (artifact / FIT_JSON).exists():
        what = "is not a folder" if artifact.exists() and not artifact.is_dir() else \
            "does not exist" if not artifact.exists() else f"has no {ARTIFACT_JSON} or {FIT_JSON}"
        raise ArtifactError(f"--artifact {artifact} {what}: not a `crvlm fit` output folder")
    manifest = read_manifest(artifact)  # a damaged, incomplete or old-format folder: one line, exit 2
    fit = json.loads((artifact / FIT_JSON).read_text()) if (artifact / FIT_JSON).exists() else {}
    return fit, manifest


def cmd_eval(args: argparse.Namespace) -> int:
    """Generate with the (steered) model, judge refusals, write ``metrics.json`` and ``samples.jsonl``.

    ``--out``, the artifact and the data are checked before the model loads, the layers and prompt lengths right
    after it; the two output files are written as a pair (a Ctrl-C waits for them)."""
    from crvlm_core.core.io import write_run_outputs
    from crvlm_core.judges.validation import judge_validation
    from crvlm_core.methods.loading import load_artifact
    from crvlm_core.evaluation import evaluate
    from crvlm_core.models.loading import on_remote

    check_out_folder(args.out)
    fit, manifest = _fitted(Path(args.artifact)) if args.artifact else ({}, {})
    kind = "policy" if args.policy or manifest.get("kind") == "policy" else manifest.get("kind") or fit.get("kind")
    if args.capability and kind in ("policy", "refusal-steering"):
        raise InputError(f"--capability does not apply to a {kind} evaluation (no single in-scope set of "
                         f"{args.capability} subjects): evaluate without it")
    if kind == "policy":
        from crvlm_core.cli.policies import cmd_eval_policy

        return cmd_eval_policy(args)
    args.test = args.test or fit.get("train") or "mmlu"  # default: the data the artifact was fitted on
    if "refusal-steering" in (manifest.get("kind"), fit.get("kind")):
        from crvlm_core.cli.refusal_steering import cli_eval

        return cli_eval(args, fit)
    model = args.model or fit.get("model") or (manifest.get("model") or {}).get("spec")
    if not model:
        raise InputError("give --artifact DIR or --model SPEC")
    in_scope = subjects(args.in_scope) or fit.get("in_scope", [])
    out_scope = subjects(args.out_scope) or fit.get("out_scope", [])
    if not in_scope:
        raise InputError("--in-scope is needed (or an artifact that records it)")
    seed = args.seed if args.seed is not None else fit.get("seed", 42)
    args.split = eval_split(args.split, args.test, fit)
    test = scoped_data(args.test, in_scope, out_scope, args.split, args.n_test, seed, "eval")
    if args.capability:  # its data and scope checked before the model loads
        from crvlm_core.capability import QuestionSets, capability, capability_questions

        capability_questions(in_scope, args.capability_n, seed, args.capability)
    handle = load_placed(args, model)
    check_layers(handle, layers=args.layers)
    check_prompt_lengths(handle, test, args.max_prompt_tokens, source=args.test)
    interventions, system, unsteered = [], None, handle
    if args.artifact:  # interventions, a system prompt, or adapted weights (a LoRA baseline's own handle)
        loaded = load_artifact(args.artifact, handle, args.alpha, parse_layers(args.layers))
        handle, interventions, system = on_remote(loaded.handle, handle.remote), loaded.interventions, loaded.system
    result = evaluate(handle, test, interventions, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      judge=args.judge, system=system)
    metrics = {**result.metrics, "judge_validation": judge_validation(args.judge),
               "artifact": str(args.artifact) if args.artifact else None,
               "method": fit.get("method") or manifest.get("kind", "unsteered"), "in_scope": in_scope,
               "test": args.test, "split": args.split,
               "layers": list(interventions[0].layers) if interventions else [],
               "alpha": getattr(interventions[0], "alpha", fit.get("alpha")) if interventions else 0.0,
               "placement": placement(handle)}
    if args.capability:  # a LoRA baseline's merged model is the steered one, the base model the unsteered one
        metrics["capability"] = capability(handle, in_scope, out_scope or None, interventions=interventions,
                                           system=system, unsteered=unsteered,
                                           sets=QuestionSets(args.capability_n, seed, args.capability),
                                           batch_size=args.batch_size, cache_dir=True)
    with deferred_interrupt():
        write_run_outputs(Path(args.out), metrics, result.rows)
    print(f"[eval] {metrics['method']} on {model}: R={metrics['refusal_rate_out']:.3f} "
          f"ORR={metrics['over_refusal_in']:.3f} MB={metrics['mb_score']:.3f} "
          f"(n_out={metrics['n_out']}, n_in={metrics['n_in']}, judge={metrics['judge']}) → {args.out}")
    if args.capability:
        c, g = metrics["capability"], metrics["capability"]["general"]
        print(f"[eval] {args.capability} accuracy steered / unsteered: in scope {c['accuracy_steered']:.3f} / "
              f"{c['accuracy_unsteered']:.3f} (n={c['n']}), general {g['accuracy_steered']:.3f} / "
              f"{g['accuracy_unsteered']:.3f} (n={g['n']})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from crvlm_core.models.specs import DEFAULT_MODEL, list_specs

    for name, desc in list_specs().items():
        print(f"{name:22s} {desc}{'  [default]' if name == DEFAULT_MODEL else ''}")
    print("…or any hub id (owner/name) or local model folder.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from crvlm_core.serve.limits import ServeLimits
    from crvlm_core.serve.server import run_server

    limits = ServeLimits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                         max_batch_size=args.batch_size, batch_window_ms=args.batch_window_ms)
    if args.engine == "vllm":
        from crvlm_core.serve.vllm_engine import run_vllm_server

        if args.device or args.device_map:
            raise InputError("--engine vllm places the model itself: leave out --device and --device-map")
        run_vllm_server(args.model, args.artifact, args.policy, args.host, args.port, limits, dtype=args.dtype)
        return 0
    run_server(args.model, args.artifact, args.policy, args.host, args.port, limits,
               load=lambda spec: load_placed(args, spec))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from collections import Counter

    from crvlm_core.data.bundled import list_datasets, load_dataset

    for name in list_datasets():
        counts = Counter(s.subject for s in load_dataset(name))
        print(f"{name:22s} {sum(counts.values()):5d}  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``crvlm`` parser: one sub-command each for fit, eval, workbook, serve, models and datasets."""
    from crvlm_core.judges.registry import DEFAULT_JUDGE, JUDGES
    from crvlm_core.methods.refusal_vectors import METHODS
    from crvlm_core.models.specs import DEFAULT_MODEL
    from crvlm_core.workbook import runner as workbook

    p = Parser(prog="crvlm", description="Configurable refusal by activation steering.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a refusal vector and save it as an artifact folder")
    add_fit_options(f, DEFAULT_MODEL, list(METHODS) + ["crvlm", "rmd", "wrmd"] + list(_baselines()))
    f.set_defaults(func=cmd_fit)
    e = sub.add_parser("eval", help="generate, judge refusals, write metrics.json and samples.jsonl")
    add_eval_options(e, DEFAULT_JUDGE, JUDGES)
    e.set_defaults(func=cmd_eval)
    w = sub.add_parser("workbook", help="run the workbook notebooks headlessly with papermill")
    workbook.add_arguments(w)
    w.set_defaults(func=workbook.run_from_args)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: <spec> unsteered, <spec>:steered with an artifact")
    add_serve_options(s, DEFAULT_MODEL)
    s.set_defaults(func=cmd_serve)
    from crvlm_core.cli.judge import add_judge_options, cmd_judge

    j = sub.add_parser("judge", help="label (prompt, response) JSONL rows as refusal or not, with a confidence")
    add_judge_options(j)
    j.set_defaults(func=cmd_judge)
    sub.add_parser("models", help="list the named model specs").set_defaults(func=cmd_models)
    sub.add_parser("datasets", help="list the bundled datasets").set_defaults(func=cmd_datasets)
    return p


def _interrupt(err: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C behind ``err`` (itself, or what it was raised while handling: nnsight re-raises its own error)."""
    for _ in range(16):
        if err is None or isinstance(err, KeyboardInterrupt):
            return err
        err = err.__cause__ or err.__context__
    return None


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> None:
    out = getattr(args, "out", None)
    if out is None:
        what = ""
    elif str(err) == "written":
        what = f"; {out} was written whole first"
    else:
        what = f"; nothing was written to {out}"
    print(f"crvlm {args.command}: interrupted{what}", file=sys.stderr)
    raise SystemExit(130) from None


def main(argv: list[str] | None = None) -> None:
    """Run ``crvlm``; bad input (a missing or damaged file or artifact, an option out of range) prints one line on
    stderr and exits 2; Ctrl-C prints one line and exits 130, with nothing half-written."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt as err:
        _interrupted(args, err)
    except Exception as err:  # bad input → one line; anything else keeps its traceback
        from crvlm_core.data.schema import DataError
        from crvlm_core.judges.base import JudgeError
        from crvlm_core.models.specs import ModelLoadError

        if _interrupt(err) is not None:
            _interrupted(args, _interrupt(err))
        if isinstance(err, (InputError, DataError, JudgeError, ModelLoadError, ValueError, FileNotFoundError)):
            print(f"crvlm {args.command}: error: {err}".splitlines()[0], file=sys.stderr)
            raise SystemExit(2) from None
        raise
    raise SystemExit(code or 0)


if __name__ == "__main__":
    main()
