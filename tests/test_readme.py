"""The README's library example runs as written (on the tiny LLaVA instead of Qwen, with tiny counts), and what it
saves loads back through the artifact registry: the first code a newcomer copies must not rot."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# what the test changes in the example: each must still be found, so the README cannot drift away from the test
SHRINK = {
    'load_model("qwen2.5-0.5b")': 'load_model("tiny-llava")',
    "n_train=100, n_test=50": "n_train=4, n_test=2",
    "CrvlmConfig(layers=[8])": "CrvlmConfig(layers=[1], width=16, epochs=2, behavioural=None)",
    "max_new_tokens=20": "max_new_tokens=3",
    "evaluate(model, test, [crvlm])": "evaluate(model, test, [crvlm], max_new_tokens=3)",
    '"runs/crvlm"': "OUT",
}


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    for old, new in SHRINK.items():
        assert old in code, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def test_readme_library_example_runs_and_its_artifact_loads(tmp_path, capsys):
    from crvlm_core.methods.loading import load_artifact

    scope = {"OUT": tmp_path / "crvlm"}
    exec(compile(_example(), str(README), "exec"), scope)
    printed = capsys.readouterr().out
    assert "mb_score" in printed and "refusal_rate_out" in printed
    loaded = load_artifact(tmp_path / "crvlm", scope["model"])
    assert loaded.manifest["kind"] == "crvlm" and len(loaded.interventions) == 1
