"""The five baselines: fit → save → load → evaluate round trips (tiny random LLaVA for the plumbing, the real
SmolLM2 where behaviour matters), CAST steering only the rows whose condition fires, the condition grid search on
planted data, and `crvlm eval` recording its judge and the judge's validation."""

import json

import pytest
import torch

from crvlm_core.core.artifacts import ArtifactError, ArtifactExists
from crvlm_core.core.errors import InputError
from crvlm_core.judges.registry import DEFAULT_JUDGE
from crvlm_core.methods.baselines.artifact import load_baseline
from crvlm_core.methods.baselines.cast import ConditionalSteering, condition_scores, grid_search_condition
from crvlm_core.methods.baselines.compare import comparison_row, in_scope_kl
from crvlm_core.methods.baselines.config import BASELINES, BaselineConfig
from crvlm_core.methods.baselines.fit import fit_baseline, fit_or_load_baseline
from crvlm_core.methods.baselines.lora import LoraTrainConfig, lora_targets, train_lora
from crvlm_core.methods.baselines.system_prompt import scope_system_prompt
from crvlm_core.cli.main import build_parser, main
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.data.bundled import load_dataset
from crvlm_core.evaluation import evaluate
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.score import steered_logits


@pytest.fixture(scope="module")
def tiny():
    from crvlm_core.models.loading import load_model

    return load_model("tiny-llava", device="cpu")


@pytest.fixture(scope="module")
def scoped():
    data = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    return split(data, n_train=3, n_test=1, seed=42)


@pytest.mark.parametrize("method", list(BASELINES))
def test_round_trip(method, tiny, scoped, tmp_path):
    train, test = scoped
    before = steered_logits(tiny, tiny.build_inputs([s.prompt for s in test]), [], last_only=True)
    weights = {n: p.detach().clone() for n, p in tiny.hf_model.named_parameters()}
    config = BaselineConfig(method, in_scope=["biology"], layers=[1], alpha=2.0, lora_steps=2, lora_target_tokens=4)
    fitted = fit_baseline(tiny, train, config, progress=False)
    assert not any(tmp_path.iterdir()), "a fit writes nothing into the artifact folder"
    fitted.save(tmp_path)
    manifest = json.loads((tmp_path / "artifact.json").read_text())
    assert manifest["kind"] == "baseline" and manifest["config"]["method"] == method
    assert json.loads((tmp_path / "baseline.json").read_text())["method"] == method
    loaded = load_baseline(tmp_path, tiny)
    assert loaded.method == method and loaded.system == fitted.system
    enc = tiny.build_inputs([s.prompt for s in test], system=loaded.system)
    same = steered_logits(loaded.handle, enc, loaded.interventions, last_only=True)
    assert torch.allclose(same, steered_logits(fitted.handle, enc, fitted.interventions, last_only=True), atol=1e-5)
    plain = steered_logits(tiny, tiny.build_inputs([s.prompt for s in test]), [], last_only=True)
    if method == "system-prompt":
        assert "biology" in loaded.system and not loaded.interventions and loaded.handle is tiny
    elif method == "lora":  # a merged copy with other weights under its own spec; the base model is untouched
        assert loaded.handle is not tiny and loaded.handle.spec.startswith("tiny-llava+lora:")
        assert (tmp_path / "lora_adapter" / "adapter_config.json").exists()
        assert not torch.allclose(same, plain, atol=1e-6)
        assert torch.equal(plain, before)
        # the merged copy shares the weights the adapter leaves alone and owns the merged ones
        ptrs = {n: p.data_ptr() for n, p in tiny.hf_model.named_parameters()}
        adapted = dict(loaded.handle.hf_model.named_parameters())
        shared = [n for n, p in adapted.items() if ptrs.get(n) == p.data_ptr()]
        assert 0 < len(shared) < len(adapted)
        assert not [n for n in shared if "language_model.layers.1." in n and n.endswith("proj.weight")]  # LoRA's layer
    else:
        assert loaded.interventions[0].alpha == 2.0 and loaded.interventions[0].layers == (1,)
    assert all(torch.equal(p, weights[n]) for n, p in tiny.hf_model.named_parameters())  # the base is untouched
    if method == "cast":
        assert loaded.info["condition_layer"] == loaded.interventions[0].gate_layer
        assert isinstance(loaded.interventions[0], ConditionalSteering)
    res = evaluate(loaded.handle, test, loaded.interventions, system=loaded.system, max_new_tokens=3, judge="keyword",
                   progress=False)
    assert res.metrics["n_in"] == 1 and res.metrics["n_out"] == 1
    base = evaluate(tiny, test, [], max_new_tokens=3, judge="keyword", progress=False)
    kl = in_scope_kl(tiny, loaded, test)
    row = comparison_row(method, res, base.rows, tiny.tokenizer, kl, 1.0, n_tokens=3)
    assert 0 <= row["mb_lo"] <= row["mb_score"] <= row["mb_hi"] <= 1 and row["kl_in"] >= 0
    # cached: the first call stores the value, an unchanged call reads it (a planted value proves the read), and
    # other samples are a new entry
    cache = tmp_path / "kl_cache"
    assert in_scope_kl(tiny, loaded, test, cache_dir=cache) == pytest.approx(kl, abs=1e-6)
    (stored,) = cache.glob("kl-*.json")
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "value": 123.0}))
    assert in_scope_kl(tiny, loaded, test, cache_dir=cache) == 123.0
    assert in_scope_kl(tiny, loaded, test[:1], cache_dir=cache) != 123.0
    assert len(list(cache.glob("kl-*.json"))) == 2


@pytest.mark.slow
def test_cast_on_smollm2_leaves_prompts_whose_condition_does_not_fire_unchanged(smollm2, tmp_path):
    """The real model: CAST adds the teacher-forced vector to the prompts whose condition fires and leaves the
    others' greedy answers exactly as the plain model's."""
    data = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    train, test = split(data, n_train=6, n_test=2, seed=42)
    fit_baseline(smollm2, train, BaselineConfig("cast", layers=[5], condition_layers=[5, 20, 25]),
                 progress=False).save(tmp_path)
    cast = load_baseline(tmp_path, smollm2)
    iv = cast.interventions[0]
    prompts = [s.prompt for s in test]
    enc = smollm2.build_inputs(prompts)
    from crvlm_core.extract import read_last_token

    fires = iv.fires(read_last_token(smollm2, enc, [iv.gate_layer])[:, 0])
    plain = steered_generate(smollm2, prompts, [], max_new_tokens=6)
    steered = steered_generate(smollm2, prompts, [iv], max_new_tokens=6)
    for f, a, b in zip(fires.tolist(), steered, plain):
        if not f:
            assert a == b
    assert cast.info["condition_layer"] in (5, 20, 25) and len(cast.info["grid"]) == 3


def test_cast_steers_only_rows_whose_condition_fires(tiny):
    prompts = ["What is a ribosome?", "Compute 17 times 23 please.", "Name a planet."]
    enc = tiny.build_inputs(prompts)
    from crvlm_core.extract import read_last_token

    gate_layer, layer = 1, 0
    summary = read_last_token(tiny, enc, [gate_layer])[:, 0]
    center = torch.zeros(tiny.hidden_size)
    cos = condition_scores(summary, center, summary[1])
    threshold = float((cos[1] + cos[[0, 2]].max()) / 2)  # only row 1 (cos = 1 with itself) fires
    vectors = torch.zeros(tiny.n_layers, tiny.hidden_size)
    vectors[layer] = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    iv = ConditionalSteering(vectors, (layer,), 4.0, condition=summary[1], center=center, gate_layer=gate_layer,
                             threshold=threshold)
    assert iv.fires(summary).tolist() == [False, True, False]
    steered = steered_logits(tiny, enc, [iv])
    plain = steered_logits(tiny, enc, [])
    mask = enc["attention_mask"].bool()
    diff = (steered - plain).abs().amax(-1)  # [batch, seq]
    assert diff[1][mask[1]].min() > 1e-4, "every real position of the firing row changes"
    assert diff[0].max() < 1e-5 and diff[2].max() < 1e-5, "rows whose condition does not fire are untouched"
    assert iv._fires is None, "the condition is released after the batch"
    with pytest.raises(RuntimeError, match="condition is unset"):
        iv.apply(layer, torch.zeros(1, 2, tiny.hidden_size))


def test_grid_search_finds_the_planted_layer():
    g = torch.Generator().manual_seed(0)
    n, d, layers = 40, 64, [3, 7, 11, 15]
    acts_in, acts_out = torch.randn(n, 4, d, generator=g), torch.randn(n, 4, d, generator=g)
    direction = torch.randn(d, generator=g)
    acts_out[:, 2] += 6.0 * direction / direction.norm()  # separable only at layer 11 (6 noise sd apart)
    acts_out[:, 1] += 0.2 * direction / direction.norm()  # a weak, noisy signal at layer 7
    result = grid_search_condition(acts_in, acts_out, layers)
    assert result["layer"] == 11 and result["mb"] > 0.95
    rows = {r["layer"]: r for r in result["table"]}
    # cross-fitting: in d=64 with 40 + 40 samples an in-sample mean difference separates pure noise perfectly;
    # out of fold the noise layers stay near chance
    assert rows[3]["mb"] < 0.85 and rows[15]["mb"] < 0.85 and rows[3]["separation"] < 1.0
    with pytest.raises(ValueError, match="columns"):
        grid_search_condition(acts_in, acts_out, layers[:2])


def test_system_prompt_names_the_scope_and_bad_input():
    assert "biology and chemistry" in scope_system_prompt(["biology", "chemistry"])
    with pytest.raises(ValueError, match="no in-scope"):
        scope_system_prompt([" "])
    with pytest.raises(ValueError, match="unknown baseline"):
        fit_baseline(None, [], BaselineConfig("telepathy"))


def test_eval_writes_the_judge_and_its_validation(tiny, tmp_path):
    assert build_parser().parse_args(["eval", "--out", "x"]).judge == DEFAULT_JUDGE == "llm-probe"
    art, ev = tmp_path / "art", tmp_path / "eval"
    for argv in (["fit", "--model", "tiny-llava", "--method", "cast", "--in-scope", "biology", "--n-train", "3",
                  "--layers", "1", "--out", str(art)],
                 ["eval", "--artifact", str(art), "--n-test", "1", "--max-new-tokens", "3", "--judge", "keyword",
                  "--out", str(ev)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    fit = json.loads((art / "fit.json").read_text())
    assert fit["method"] == "cast" and fit["layers"] == [1] and "condition_layer" in fit and fit["n_in"] == 3
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["method"] == "cast" and metrics["judge"] == "keyword"
    # the keyword rule on the 51 held-out human labels: 35 right (the README's 0.686, κ 0.429)
    v = metrics["judge_validation"]
    assert v["n"] == 51 and v["accuracy"] == pytest.approx(35 / 51) and v["kappa"] == pytest.approx(0.4286, abs=1e-3)


def test_lora_training_loop_lowers_the_loss_and_stops_on_divergence():
    from crvlm_core.models.lora_training import train_lora_steps

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    batches = [{"x": x, "y": y}] * 40
    losses = train_lora_steps(model, batches, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean(), lr=0.1,
                              progress=False)
    assert len(losses) == 40 and losses[-1] < 0.1 * losses[0]
    assert not any(p.requires_grad for p in model.parameters()) and not model.training  # frozen for use
    model.requires_grad_(True)
    with pytest.raises(FloatingPointError, match="diverged at step 1"):
        train_lora_steps(model, [{"x": x}], lambda m, b: m(b["x"]).sum() * float("nan"), lr=0.1, progress=False)
    with pytest.raises(ValueError, match="no trainable"):
        train_lora_steps(torch.nn.Linear(2, 2).requires_grad_(False), [], lambda m, b: 0, lr=0.1)


def test_lora_with_gradient_checkpointing_trains_the_same_adapter(smollm2, scoped):
    """Checkpointing (the default) changes memory and time only: same losses, same adapter; the caller's model is
    left without checkpointing."""
    train, _ = scoped
    targets = ["Sorry, I can't help with that." if s.scope == "out" else "Cells divide by mitosis." for s in train]
    runs = {ck: train_lora(smollm2, train, targets, LoraTrainConfig(steps=2, batch_size=2, checkpointing=ck),
                           progress=False)
            for ck in (False, True)}
    assert [h["loss"] for h in runs[True][1]] == [h["loss"] for h in runs[False][1]]
    a, b = ({k: v for k, v in m.state_dict().items() if "lora_" in k} for m, _ in (runs[False], runs[True]))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in smollm2.hf_model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in runs[True][0].modules())


def test_config_validates_its_fields():
    c = BaselineConfig("cast", layers=[3, 1], condition_layers=range(2, 4), in_scope=["biology"])
    assert c.layers == (3, 1) and c.condition_layers == (2, 3) and c.in_scope == ("biology",)
    assert BaselineConfig(**c.to_dict()) == c  # what artifact.json records round-trips
    assert c.lora() == LoraTrainConfig(rank=8, steps=48, lr=5e-4, batch_size=4, seed=42)
    for bad, match in [({"alpha": float("nan")}, "alpha"), ({"layers": []}, "layers must be a non-empty list"),
                       ({"lora_rank": 0}, "rank"), ({"lora_lr": -1.0}, "lr"), ({"batch_size": 0}, "batch_size"),
                       ({"layers": ["x"]}, "layer numbers")]:
        with pytest.raises(InputError, match=match):
            BaselineConfig("actadd", **bad)
    with pytest.raises(ValueError, match="modules"):
        LoraTrainConfig(modules=())


def test_artifact_is_written_whole_once_and_verified(tiny, scoped, tmp_path):
    """A second save into a fitted folder stops and leaves it byte-identical; force replaces it; a damaged file or
    another model's shape is one clear error; an unchanged fit is reused from the folder."""
    train, _ = scoped
    config = BaselineConfig("actadd", layers=[1], alpha=2.0)
    fitted = fit_baseline(tiny, train, config, progress=False)
    art = fitted.save(tmp_path / "art", extra_json={"fit.json": {"method": "actadd"}})
    before = {p: p.read_bytes() for p in art.rglob("*") if p.is_file()}
    assert {p.relative_to(art).as_posix() for p in before} >= {"artifact.json", "fit.json", "baseline.json",
                                                                 "vector/vector.json", "vector/vector.safetensors"}
    with pytest.raises(ArtifactExists):
        fitted.save(art)
    assert {p: p.read_bytes() for p in art.rglob("*") if p.is_file()} == before
    fitted.save(art, force=True)
    assert load_baseline(art, tiny).interventions[0].alpha == 2.0
    assert load_baseline(art, tiny, alpha=0.5, layers=[0]).interventions[0].layers == (0,)
    fit_baseline(tiny, train, BaselineConfig("system-prompt"), progress=False).save(tmp_path / "sp")
    with pytest.raises(InputError, match="do not apply"):
        load_baseline(tmp_path / "sp", tiny, alpha=1.0)
    other = type("Other", (), {"spec": "other", "hidden_size": tiny.hidden_size + 1, "n_layers": tiny.n_layers})()
    with pytest.raises(ArtifactError, match="was fitted on"):
        load_baseline(art, other)
    with pytest.raises(ArtifactError, match="holds a 'baseline' artifact"):
        from crvlm_core.core.artifacts import read_manifest

        read_manifest(art, kinds=("policy",))
    (art / "vector" / "vector.safetensors").write_bytes(b"damaged")
    with pytest.raises(ArtifactError, match="changed or damaged"):
        load_baseline(art, tiny)
    reused = tmp_path / "reused"
    first = fit_or_load_baseline(tiny, train, config, reused, progress=False)
    written = (reused / "artifact.json").stat().st_mtime_ns
    again = fit_or_load_baseline(tiny, train, config, reused, progress=False)
    assert again.info == first.info and (reused / "artifact.json").stat().st_mtime_ns == written  # read back
    assert torch.equal(again.vector.directions, first.vector.directions)
    changed = fit_or_load_baseline(tiny, train, BaselineConfig("actadd", layers=[1], alpha=3.0), reused, progress=False)
    assert changed.info["alpha"] == 3.0 and load_baseline(reused, tiny).interventions[0].alpha == 3.0  # refitted


def test_lora_targets_are_cached(tiny, scoped, tmp_path):
    train, _ = scoped
    targets = lora_targets(tiny, train, max_new_tokens=3, cache_dir=tmp_path, progress=False)
    assert [t for t, s in zip(targets, train) if s.scope == "out"] == ["I'm sorry, but I can't assist with that."] * 3
    (entry,) = tmp_path.glob("lora_targets-*.json")
    stored = json.loads(entry.read_text())
    stored["value"] = {k: "planted" for k in stored["value"]}
    entry.write_text(json.dumps(stored))
    again = lora_targets(tiny, train, max_new_tokens=3, cache_dir=tmp_path, progress=False)
    assert [t for t, s in zip(again, train) if s.scope == "in"] == ["planted"] * 3
