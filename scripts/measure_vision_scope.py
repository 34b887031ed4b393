"""Image-scoped CR-VLM on ``llava-dinov2-qwen2.5-0.5b`` (#20), with and without L_vision: fitted on the bundled
``images`` pictures (``--in-scope`` kind in, the other three kinds out; the question text never names the kind),
measured on the 160 held-out ``images_test`` pictures (:func:`crvlm_core.vision_ablation.vision_ablation`), and how
well a linear probe reads the scope from the steered and gate layers' last-token states (``scope_probe``). Writes
``outputs/vision/<in-scope>/metrics.json`` (and each variant's samples) whole; fits and evaluations are cached.

    python scripts/measure_vision_scope.py [--in-scope animal] [--behavioural-epochs 1] [--behavioural-n N]
        [--layers 8 ...] [--target-scale 1.0] [--hard-gate]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from crvlm_core.core.io import atomic_write_json
from crvlm_core.core.paths import outputs_dir
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.splits import assign_scope
from crvlm_core.methods.crvlm.config import BehaviouralConfig, CrvlmConfig
from crvlm_core.methods.refusal_vectors import default_layers
from crvlm_core.models.loading import load_model
from crvlm_core.vision_ablation import scope_probe, vision_ablation

MODEL = "llava-dinov2-qwen2.5-0.5b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-scope", default="animal", choices=["animal", "plant", "food", "flag"])
    ap.add_argument("--behavioural-epochs", type=int, default=1)
    ap.add_argument("--behavioural-n", type=int, default=None)
    ap.add_argument("--behavioural-lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="steered layers (default: a third up)")
    ap.add_argument("--target-scale", type=float, default=1.0, help="λ of the out-of-scope target h_out + λ·s")
    ap.add_argument("--hard-gate", action="store_true", help="round the prefill gate to 0 / 1 at 0.5")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or outputs_dir() / "vision" / args.in_scope
    start = time.time()
    vlm = load_model(MODEL)
    train = assign_scope(load_dataset("images"), in_scope=[args.in_scope])
    test = assign_scope(load_dataset("images_test"), in_scope=[args.in_scope])
    behavioural = BehaviouralConfig(epochs=args.behavioural_epochs, seed=args.seed, max_per_scope=args.behavioural_n,
                                    lr=args.behavioural_lr) if args.behavioural_epochs else None
    config = CrvlmConfig(layers=args.layers or list(default_layers(vlm)), gate_layer="auto", epochs=args.epochs,
                         seed=args.seed, behavioural=behavioural, target_scale=args.target_scale,
                         hard_gate=args.hard_gate)
    result = vision_ablation(vlm, train, test, config, max_new_tokens=args.max_new_tokens,
                             cal_cache=True, eval_cache=outputs_dir() / "cache" / "evaluations", progress=True)
    steerings = result.pop("steerings")
    gate_layer = steerings["with L_vision"].gate_layer
    probe_layers = sorted({*config.layers, *([gate_layer] if gate_layer is not None else [])})
    probe = scope_probe(vlm, train, test, probe_layers, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, variant in [("unsteered", result["unsteered"]), *result["variants"].items()]:
        rows = variant.pop("rows")
        (out / f"samples-{name.replace(' ', '_')}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"model": MODEL, "model_key": vlm.key, "in_scope": [args.in_scope], "train": "images (all)",
               "test": "images_test (all)", "n_train_in": sum(s.scope == "in" for s in train),
               "n_train_out": sum(s.scope == "out" for s in train), "layers": list(config.layers),
               "gate_layer": gate_layer, "scope_probe": probe, "epochs": args.epochs,
               "target_scale": args.target_scale, "hard_gate": args.hard_gate,
               "behavioural_epochs": args.behavioural_epochs, "behavioural_n": args.behavioural_n,
               "behavioural_lr": args.behavioural_lr,
               "max_new_tokens": args.max_new_tokens, "judge": "keyword", "seed": args.seed,
               "seconds": round(time.time() - start, 1), **result}
    path = atomic_write_json(out / "metrics.json", metrics)
    for name, v in result["variants"].items():
        print(f"{name:18s} R {v['refusal_rate_out']:.3f} ORR {v['over_refusal_in']:.3f} MB {v['mb_score']:.3f} "
              f"{v['mb_score_ci']} unchanged {v[f'unchanged_{args.max_new_tokens}_in']:.2f} "
              f"cos {v['shift_cosine']['mean']:.2f} image-only out {v['image_only_score_out']['mean']:.2f} "
              f"in {v['image_only_score_in']['mean']:.2f}", file=sys.stderr)
    for layer, r in probe.items():
        print(f"scope probe at layer {layer}: AUC {r['auc']:.3f}, accuracy {r['accuracy']:.3f}", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
