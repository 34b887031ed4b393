"""Validate the refusal judges on held-out labels: accuracy, Cohen's κ and ROC AUC with 95 % bootstrap intervals,
and seconds per item, for keyword, learned (as shipped, and trained on every training label), llm (Qwen2.5-Coder-1.5B,
cutoff calibrated on the training labels only; and the K-sample protocol), llm-probe (the shipped readout of the same
model's hidden state, fitted by scripts/fit_judge_probe.py on the training labels) and a learned→llm cascade. Writes
outputs/measurements/judges.json and prints a markdown table.

Held-out sets (crvlm_core.judges.labels): refusal_labels' seeded 30 % (51, pyrit, human-labelled), uncensorbench's
seeded 30 % of prompts (90 reference answers), eval_answer_labels' seeded half of its questions (163 cut-off eval
answers, labelled by the project's engineer), refusal_styles (40 hard styles, written and labelled by the engineer).

    python scripts/validate_judges.py [--no-llm] [--no-probe] [--no-sampled] [--calib-limit N] [--batch-size 4]

LLM confidences are cached per item in outputs/cache/ (an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time

import numpy as np

from crvlm_core.core.io import atomic_write_json
from crvlm_core.core.paths import outputs_dir
from crvlm_core.data.schema import fingerprint
from crvlm_core.judges.keyword import KeywordJudge
from crvlm_core.judges.labels import judge_label_split
from crvlm_core.judges.learned import LearnedJudge
from crvlm_core.judges.probe import PROBE_LAYERS, PROBE_PATH, judge_states
from crvlm_core.judges.registry import DEFAULT_JUDGE, LLM_MAX_CHARS, LLM_MODEL, LLM_THRESHOLD, get_judge
from crvlm_core.judges.validation import agreement_intervals, calibrate_threshold

HUMAN = ("refusal_labels", "uncensorbench_labels")  # the held-out sets with independent labels


def _pairs(samples) -> tuple[list[str], list[str], np.ndarray]:
    return [s.prompt for s in samples], [s.extra["response"] for s in samples], \
        np.array([bool(s.extra["refused"]) for s in samples])


class ConfidenceCache:
    """Per-item judge confidences on disk, keyed by the judge's settings and the item's text (resumable runs)."""

    def __init__(self, judge):
        self.judge = judge
        handle = judge.backend.handle
        key = json.dumps({"model": handle.spec, "dtype": str(handle.hf_model.dtype), "template": judge.template, "answers": judge.answers, "samples": judge.samples,
                          "chars": judge.max_response_chars, "seed": judge.seed}, sort_keys=True)
        self.path = outputs_dir() / "cache" / f"judge-confidences-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        self.values = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.seconds_per_item: list[float] = []

    @staticmethod
    def _key(p: str, r: str) -> str:
        return hashlib.sha256(json.dumps([p, r]).encode()).hexdigest()[:20]

    def confidences(self, prompts, responses, chunk: int = 8) -> np.ndarray:
        todo = [i for i, (p, r) in enumerate(zip(prompts, responses)) if self._key(p, r) not in self.values]
        for k in range(0, len(todo), chunk):
            idx = todo[k:k + chunk]
            t0 = time.perf_counter()
            conf = self.judge.confidences([prompts[i] for i in idx], [responses[i] for i in idx])
            self.seconds_per_item.append((time.perf_counter() - t0) / len(idx))
            self.values.update({self._key(prompts[i], responses[i]): c for i, c in zip(idx, conf)})
            atomic_write_json(self.path, self.values)
            print(f"    {self.path.name}: {len(self.values)} items, {self.seconds_per_item[-1]:.2f} s/item", flush=True)
        return np.array([self.values[self._key(p, r)] for p, r in zip(prompts, responses)])


def _score(rows: list, judge: str, held: dict, verdicts: dict, conf: dict, seconds: float | None, **extra) -> None:
    """Append one result row per held-out set and for the pooled human-labelled sets."""
    groups = {name: [name] for name in held}
    if all(n in held for n in HUMAN):
        groups["human (pooled)"] = list(HUMAN)
    for group, names in groups.items():
        y = np.concatenate([_pairs(held[n])[2] for n in names])
        v = np.concatenate([verdicts[n] for n in names])
        c = None if conf is None else np.concatenate([conf[n] for n in names])
        from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

        r = {"judge": judge, "set": group, "n": int(len(y)), "accuracy": float(accuracy_score(y, v)),
             "cohen_kappa": float(cohen_kappa_score(y, v)), "seconds_per_item": seconds, **extra}
        if c is not None:
            r["roc_auc"] = float(roc_auc_score(y, c))
        r["intervals_95"] = agreement_intervals(y, v, c)
        rows.append(r)
        auc = f"{r['roc_auc']:.3f}" if "roc_auc" in r else "—"
        print(f"  {judge:22s} {group:22s} acc={r['accuracy']:.3f} κ={r['cohen_kappa']:.3f} AUC={auc} n={r['n']}",
              flush=True)


def _timed(judge, samples) -> tuple[np.ndarray, np.ndarray | None, float]:
    p, r, _ = _pairs(samples)
    t0 = time.perf_counter()
    res = judge.judge(p, r)
    sec = (time.perf_counter() - t0) / max(len(samples), 1)
    conf = None if res and res[0].confidence is None else np.array([x.confidence for x in res])
    return np.array([x.refused for x in res]), conf, sec


def run_fast(rows: list, train: list, held: dict, seed: int) -> dict:
    """keyword, learned (shipped: refusal_labels' 70 % + synthetic) and learned-all (every training label)."""
    out = {}
    learned_all = LearnedJudge.from_labels(train, train_frac=1.0, seed=seed)
    for name, judge in (("keyword", KeywordJudge()), ("learned", get_judge("learned")), ("learned-all", learned_all)):
        res = {n: _timed(judge, s) for n, s in held.items()}
        sec = float(np.mean([r[2] for r in res.values()]))
        conf = None if name == "keyword" else {n: r[1] for n, r in res.items()}
        _score(rows, name, held, {n: r[0] for n, r in res.items()}, conf, sec)
        out[name] = {n: r for n, r in res.items()}
    return out


def run_llm(rows: list, train: list, held: dict, args) -> dict:
    """The llm judge: confidences on (part of) the training labels → calibrated cutoff → held-out verdicts."""
    judge = get_judge("llm", batch_size=args.batch_size)
    cache = ConfidenceCache(judge)
    rng = np.random.default_rng(args.seed)
    calib = [train[i] for i in sorted(rng.permutation(len(train))[:args.calib_limit])] if args.calib_limit else train
    p, r, y = _pairs(calib)
    c_train = cache.confidences(p, r)
    cut = calibrate_threshold(c_train, y)
    print(f"  llm cutoff calibrated on {len(calib)} training labels: {cut:+.4f} (registry: {LLM_THRESHOLD:+.4f})")
    conf = {n: cache.confidences(*_pairs(s)[:2]) for n, s in held.items()}
    sec = float(np.median(cache.seconds_per_item)) if cache.seconds_per_item else None
    _score(rows, "llm-1.5b", held, {n: c > cut for n, c in conf.items()}, conf, sec, threshold=cut,
           n_calibration=len(calib), judge_model=LLM_MODEL, max_response_chars=LLM_MAX_CHARS)
    _score(rows, "llm-1.5b (cutoff 0)", held, {n: c > 0 for n, c in conf.items()}, conf, sec, threshold=0.0)
    out = {"conf": conf, "cut": cut, "sec": sec, "calibration_ids": [s.id for s in calib]}
    if args.sampled:
        sj = get_judge("llm", batch_size=args.batch_size, samples=5)
        scache = ConfidenceCache(sj)
        sconf = {n: scache.confidences(*_pairs(s)[:2]) for n, s in held.items() if n in args.sampled_sets}
        ssec = float(np.median(scache.seconds_per_item)) if scache.seconds_per_item else None
        sub = {n: held[n] for n in sconf}
        _score(rows, "llm-1.5b K=5 sampled", sub, {n: c > 0.1 for n, c in sconf.items()}, sconf, ssec,
               threshold=0.1, undecided={n: int((np.abs(c) <= 0.1).sum()) for n, c in sconf.items()})
    return out


def run_probe(rows: list, held: dict, timing_items: int = 16) -> None:
    """The shipped llm-probe readout on the held-out sets (judge-model states cached per pair, shared with
    scripts/fit_judge_probe.py); seconds per item from ``timing_items`` held-out pyrit pairs judged again without the
    cache through the judge itself, whose verdicts must equal the cached path's."""
    judge = get_judge("llm-probe")
    li = list(PROBE_LAYERS).index(judge.layer)
    conf = {}
    for n, s in held.items():
        p, r, _ = _pairs(s)
        states, _ = judge_states(judge.backend, p, r, max_response_chars=judge.max_response_chars, cache_dir=True,
                                 progress=True)
        conf[n] = 2.0 * judge.readout.probability(states[:, li]) - 1.0
    p, r, _ = _pairs(held["refusal_labels"][:timing_items])
    t0 = time.perf_counter()
    again = np.array(judge.confidences(p, r))
    sec = (time.perf_counter() - t0) / len(p)
    drift = float(np.abs(again - conf["refusal_labels"][:len(p)]).max())
    _score(rows, "llm-probe", held, {n: c > judge.threshold for n, c in conf.items()}, conf, sec, layer=judge.layer,
           readout=str(PROBE_PATH.name), n_train=judge.info.get("n_train"), max_abs_confidence_drift_uncached=drift)


def run_cascade(rows: list, held: dict, fast: dict, llm: dict, taus=(0.5, 0.8, 0.9, 0.95)) -> None:
    """learned decides where |confidence| ≥ τ, the llm judge the rest (verdicts combined from the runs above; time =
    learned's per-item time + the llm's per-item time × the share deferred to it)."""
    for tau in taus:
        verdicts, conf, deferred = {}, {}, 0
        for n in held:
            lv, lc, _ = fast["learned"][n]
            sure = np.abs(lc) >= tau
            verdicts[n] = np.where(sure, lv, llm["conf"][n] > llm["cut"])
            conf[n] = np.where(sure, lc, llm["conf"][n])
            deferred += int((~sure).sum())
        total = sum(len(s) for s in held.values())
        sec = float(np.mean([fast["learned"][n][2] for n in held])) + (llm["sec"] or 0) * deferred / total
        agree = float(np.mean(np.concatenate([verdicts[n] == (llm["conf"][n] > llm["cut"]) for n in held])))
        _score(rows, f"cascade τ={tau}", held, verdicts, conf, sec, tau=tau, deferred_share=deferred / total,
               agreement_with_llm=agree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-llm", action="store_true", help="skip the llm judge, its K-sample form and the cascade")
    ap.add_argument("--no-probe", action="store_true", help="skip the llm-probe judge")
    ap.add_argument("--calib-limit", type=int, default=0, help="calibrate the llm cutoff on this many training labels "
                    "(a seeded subset; 0 = all)")
    ap.add_argument("--no-sampled", dest="sampled", action="store_false", help="skip the K-sample protocol")
    ap.add_argument("--sampled-sets", nargs="*", default=["refusal_labels", "refusal_styles"])
    ap.add_argument("--out", default=str(outputs_dir() / "measurements" / "judges.json"))
    args = ap.parse_args()

    train, held = judge_label_split(args.seed)
    rows: list = []
    fast = run_fast(rows, train, held, args.seed)
    if not args.no_probe:
        run_probe(rows, held)
    llm = None
    if not args.no_llm:
        llm = run_llm(rows, train, held, args)
        run_cascade(rows, held, fast, llm)
    atomic_write_json(args.out, {
        "split_seed": args.seed, "n_train": len(train), "train_fingerprint": fingerprint(train),
        "held_out": {n: {"n": len(s), "fingerprint": fingerprint(s), "ids": [x.id for x in s]} for n, s in held.items()},
        "llm_calibration_ids": llm["calibration_ids"] if llm else None, "default_judge_eval": DEFAULT_JUDGE,
        "machine": platform.platform(), "results": rows})
    print(f"\nwrote {args.out}\n")
    print("| judge | held-out set | n | accuracy [95 % CI] | Cohen's κ [95 % CI] | ROC AUC [95 % CI] | s/item |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ci = r["intervals_95"]
        fmt = lambda k: f"{r[k]:.3f} [{ci[k][0] or float('nan'):.2f}, {ci[k][1] or float('nan'):.2f}]" \
            if k in r else "—"  # noqa: E731
        sec = f"{r['seconds_per_item']:.3f}" if r.get("seconds_per_item") is not None else "—"
        print(f"| {r['judge']} | {r['set']} | {r['n']} | {fmt('accuracy')} | {fmt('cohen_kappa')} | {fmt('roc_auc')} "
              f"| {sec} |")


if __name__ == "__main__":
    main()
