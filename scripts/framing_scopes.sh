#!/usr/bin/env bash
# Issue #25: plain vs framed MB on the held-out half of the plain questions, per scope and method. Each fit is skipped
# when its artifact exists, each measurement when its JSON does; answers are cached (outputs/cache). Heavy jobs take
# the benchmarks' lock one at a time.
#
#   bash scripts/framing_scopes.sh "biology physics geography" "crvlm-robust cast persona system-prompt"
#     → outputs/framing/<scope>/fits/<method>/ and outputs/framing/<scope>/<method>-mb-heldout.json
#
# crvlm-robust: MMLU's train half (100 per scope) + all of plain_questions_train (1480 questions), one framed copy of
# each training question (training templates), the prefill gate fitted alone as a class-balanced logistic probe, then
# frozen; the refusal vector from the MMLU questions; the behavioural stage on 100 questions per scope.
# crvlm-robust2 (third round): the same with two framed copies of each training question and --hard-gate (the gate's
# value rounded at 0.5: no update at all on a question gated in scope).
# crvlm-robust3 (third round, the recipe): crvlm-robust2 with a gate that reads the last prompt token at layer 8
# (the steered layer) as well as at the gate layer, concatenated (--gate-extra-layers 8).
# crvlm-robust3-push (fourth round): the crvlm-robust3 fit measured with --in-scope-push $PUSH (default 0.25, chosen on dev): where
# the gate reads in scope, the refusal vector reversed. The push is applied at generation only, so a fit with
# `--in-scope-push` trains the same calibrator: the robust3 artifact is reused rather than fitted again.
# crvlm-robust-v1 (the first round, kept to compare): plain_questions_train at most 100 per scope (its first 670 rows
# then), behavioural stage on all plain training questions, an unweighted probe.
# crvlm-mlpgate: the same data, a one-hidden-layer gate (256 wide) trained jointly with the flow network.
# crvlm and the baselines: the CLI's defaults on MMLU's train half (100 per scope), as notebook 03 fits them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LOCK=/tmp/crvlm-heavy.lock
SCOPES=${1:-"biology physics geography"}
METHODS=${2:-"crvlm-robust crvlm system-prompt persona cast lora"}
for scope in $SCOPES; do
  dir=outputs/framing/$scope
  mkdir -p "$dir/fits"
  for name in $METHODS; do
    fit=$name measure=()
    if [ "$name" = crvlm-robust3-push ]; then fit=crvlm-robust3 measure=(--in-scope-push "${PUSH:-0.25}"); fi
    case $fit in
      crvlm-robust) opts=(--method crvlm --train-extra plain_questions_train --n-train-extra 1500 --framing-augment 1
                          --gate-fit probe --behavioural-n 100) ;;
      crvlm-robust2) opts=(--method crvlm --train-extra plain_questions_train --n-train-extra 1500 --framing-augment 2
                           --gate-fit probe --behavioural-n 100 --hard-gate) ;;
      crvlm-robust3) opts=(--method crvlm --train-extra plain_questions_train --n-train-extra 1500 --framing-augment 2
                           --gate-fit probe --gate-extra-layers 8 --behavioural-n 100 --hard-gate) ;;
      crvlm-mlpgate) opts=(--method crvlm --train-extra plain_questions_train --framing-augment 1 --gate-hidden 256) ;;
      *) opts=(--method "$name") ;;
    esac
    [ -f "$dir/fits/$fit/artifact.json" ] || flock $LOCK $PY -m crvlm_core.cli fit --in-scope "$scope" \
      --n-train 100 --out "$dir/fits/$fit" "${opts[@]}"
    out=$dir/$name-mb-heldout.json
    [ -f "$out" ] || flock $LOCK $PY scripts/measure_framing.py --artifact "$dir/fits/$fit" --in-scope "$scope" \
      --judge keyword --part held-out "${measure[@]}" --out "$out"
    dev=$dir/$fit-gate-dev.json  # a prefill gate's accuracy on the dev half (no generation)
    [ "${name#crvlm}" = "$name" ] || [ -f "$dev" ] || flock $LOCK $PY scripts/measure_framing.py \
      --artifact "$dir/fits/$fit" --in-scope "$scope" --gate-only --part dev --out "$dev"
  done
done
