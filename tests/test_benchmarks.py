"""Benchmarks: the runner's table and the result schema (on a --quick run of a real benchmark script on a tiny model),
and the hook fast path of steered generation against the nnsight path (same tokens)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import run_all  # noqa: E402


def _doc(table):
    return {"name": "x", "model": "m", "quick": True, "date": "2026-01-01T00:00:00Z", "seconds": 1.0,
            "machine": {"cpu_count": 2, "torch_threads": 2, "torch": "t", "transformers": "5", "nnsight": "0.8",
                        "load_average_start": [1.0, 1.0, 1.0], "load_average_end": [2.0, 1.0, 1.0]},
            "params": {}, "results": {}, "table": table}


def test_table_formatting_marks_goals_and_units():
    docs = {"generation": _doc([common.row("calibrator / unsteered", 0.912345, "×", "≥ 0.85", True),
                                common.row("batch 1 tok/s", 12.0, "tok/s"),
                                common.row("LoRA", "not available")]),
            "capture": _doc([common.row("extract / plain forward", 1.2, "×", "≤ 1.05", False)])}
    text = run_all.format_table(docs)
    lines = text.splitlines()
    assert lines[0] == "| benchmark | metric | value | goal | met |"
    assert "| generation | calibrator / unsteered | 0.912 × | ≥ 0.85 | ✓ |" in lines
    assert "| generation | batch 1 tok/s | 12 tok/s |  |  |" in lines
    assert "| generation | LoRA | not available |  |  |" in lines
    assert "| capture | extract / plain forward | 1.2 × | ≤ 1.05 | ✗ missed |" in lines
    assert "2 CPUs" in run_all.machine_line(docs) and "load average during the runs 2.0" in run_all.machine_line(docs)


def test_foreign_schema_rows_and_validation():
    rows = run_all.rows_of({"clients": {"1": {"requests_per_s": 2.5}}, "model": "m", "ok": True})
    assert rows == [{"metric": "clients.1.requests_per_s", "value": 2.5, "unit": "", "goal": None, "met": None}]
    common.validate_result(_doc([common.row("a", 1.0)]))
    bad = _doc([{"metric": "a", "value": 1}])
    with pytest.raises(ValueError, match="keys"):
        common.validate_result(bad)
    with pytest.raises(ValueError, match="lacks"):
        common.validate_result({"name": "x"})


def test_quick_capture_run_writes_valid_json(tmp_path):
    """A real --quick run of the capture benchmark on a tiny random model, through the runner (no lock)."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--model",
                           "tiny-llava", "--only", "capture,kl_memory,end_to_end", "--out", str(out), "--no-lock"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "capture.json").read_text())
    common.validate_result(doc)
    assert doc["model"] == "tiny-llava" and doc["quick"] is True
    res = doc["results"]["n8"]
    assert res["max_abs_diff_vs_hooks"] < 1e-4  # the library's reads equal plain hook reads
    for key in ("plain_forward", "plain_hooks", "crvlm_extract"):
        assert res[key]["median"] > 0 and res[key]["runs"]
    assert "| capture | capture 8 prompts: extract / plain forward |" in proc.stdout
    common.validate_result(json.loads((out / "end_to_end.json").read_text()))
    kl = json.loads((out / "kl_memory.json").read_text())
    common.validate_result(kl)
    assert kl["results"]["same_value"] is True  # the chunked KL equals the whole-block formula


def test_llava_memory_stages(tmp_path):
    """The text-then-vision memory sequence of notebook 04 on the SmolLM2 LLaVA (--quick): every stage recorded, the
    unload visible as a drop, and SmolLM2's full vocabulary grown by the one ``<image>`` row (a copy)."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_llava_memory.py"), "--quick", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "llava_memory.json").read_text())
    common.validate_result(doc)
    st = doc["results"]["stages"]
    assert set(st) == {"text model in use", "text model unloaded", "composite built",
                       "composite after a forward on image prompts"}
    assert st["text model unloaded"]["VmRSS"] < st["text model in use"]["VmRSS"]
    assert all(s["VmRSS"] <= s["VmHWM"] + 1e-3 for s in st.values())
    r = doc["results"]
    assert r["embedding_rows"] == r["tokenizer_length"] == r["base_embedding_rows"] + 1 == r["image_token_id"] + 1
    assert r["embedding_and_output_copied"] is True and r["embedding_and_output_bytes_gb"] > 0


def test_notebook_memory_profile_attributes_memory_to_cells(tmp_path):
    """The per-cell memory profiler on notebook 00 (smoke, SmolLM2): one row per code cell, the resident set split
    into anonymous and file-backed memory, and the model's load visible as a rise."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_notebook_memory.py"), "00", "--quick",
                           "--model", "smollm2-135m", "--out", str(out), "--param", f"OUT_ROOT={tmp_path / 'outputs'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "memory_00.json").read_text())
    common.validate_result(doc)
    cells = doc["results"]["cells"]
    import nbformat

    nb = nbformat.read(ROOT / "workbook" / "00_setup_and_data.ipynb", as_version=4)
    assert len(cells) == sum(c.cell_type == "code" for c in nb.cells)
    for c in cells:
        assert c["rss_peak_mb"] >= c["rss_end_mb"] > 0
        assert abs(c["anon_end_mb"]) > 0 and c["file_peak_mb"] > 0
    # SmolLM2's weights (135 M float32 parameters, ~0.5 GB) are resident after the cell that loads it
    assert max(c["rss_end_mb"] for c in cells) - cells[0]["rss_start_mb"] > 300
    assert (tmp_path / "outputs" / "memprofile" / "00_setup_and_data" / "metrics.json").exists()


@pytest.fixture(scope="module")
def tiny():
    from crvlm_core.models.loading import load_model

    return load_model("tiny-llava", device="cpu")


def test_hook_fast_path_generates_the_same_tokens_as_nnsight(smollm2):
    from crvlm_core.steer.interventions import AddVector, HiddenStateFn, ProjectOut
    from crvlm_core.steer.generate import steered_generate

    torch.manual_seed(0)
    v = torch.randn(smollm2.n_layers, smollm2.hidden_size) * 2.0
    prompts = ["What is a ribosome?", "Name a prime number larger than ten, please."]
    ivs = [AddVector(v, (3, 5), 1.5), ProjectOut(v, (7,), 1.0),
           HiddenStateFn(lambda layer, h: h * 1.01, (5,))]
    fast = steered_generate(smollm2, prompts, ivs, max_new_tokens=8, backend="hooks")
    slow = steered_generate(smollm2, prompts, ivs, max_new_tokens=8, backend="nnsight")
    plain = steered_generate(smollm2, prompts, [], max_new_tokens=8)
    assert fast == slow
    assert fast != plain  # the interventions did something
    with pytest.raises(ValueError, match="backend"):
        steered_generate(smollm2, prompts, ivs, max_new_tokens=2, backend="vllm")


def test_hook_fast_path_with_prefill_gated_calibrator(tiny):
    """The calibrator (prefill gate) through both backends on a tiny model: identical token ids."""
    from crvlm_core.methods.crvlm.calibrated import CalibratedSteering
    from crvlm_core.methods.crvlm.module import Calibrator
    from crvlm_core.methods.crvlm.config import CalibratorConfig
    from crvlm_core.steer.apply import validated
    from crvlm_core.steer.generate import generate_batch

    torch.manual_seed(0)
    cfg = CalibratorConfig(hidden_size=tiny.hidden_size, layers=[1], width=32, gate_dim=tiny.hidden_size)
    cal = Calibrator(cfg)
    with torch.no_grad():
        for p in cal.parameters():
            p.add_(torch.randn_like(p))
    steer = CalibratedSteering(cal, (1,), gate_layer=tiny.n_layers - 1)
    enc = tiny.build_inputs(["hello there", "a longer prompt with more words"])
    table = validated(tiny, [steer])
    ids = {}
    for backend in ("hooks", "nnsight"):
        ids[backend] = generate_batch(tiny, enc, table, 6, backend=backend)  # prepares the gate itself
    plain = tiny.hf_model.generate(**enc, max_new_tokens=6, do_sample=False,
                                   pad_token_id=tiny.tokenizer.pad_token_id).cpu()
    assert torch.equal(ids["hooks"], ids["nnsight"])
    assert cal._gate_override is None  # released after each batch
    assert ids["hooks"].shape == plain.shape


def test_end_to_end_counts_a_workbook_assembled_from_only_runs(tmp_path):
    import bench_end_to_end

    nb = {"00_a": {"status": "ok", "seconds": 10.0, "peak_rss_mb": 900.0, "carried_over": "2026-01-01T00:00:00"},
          "01_b": {"status": "ok", "seconds": 30.0, "peak_rss_mb": 1200.0}}
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "summary.json").write_text(json.dumps({
        "run": "default", "smoke": False, "ok": True, "seconds": 31.0, "notebook_seconds": 40.0,
        "peak_rss_mb": 1200.0, "notebooks": nb, "finished": "2026-01-02"}))
    nb2 = {**nb, "01_b": {"status": "skipped"}}
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "summary.json").write_text(json.dumps({"run": "part", "smoke": False, "ok": True,
                                                                 "seconds": 11.0, "notebooks": nb2}))
    runs = {r["run"]: r for r in bench_end_to_end.read_runs(tmp_path)}
    assert runs["default"]["full"] and runs["default"]["seconds"] == 40.0
    assert runs["default"]["carried_over"] == ["00_a"]
    assert not runs["part"]["full"] and runs["part"]["seconds"] == 11.0
