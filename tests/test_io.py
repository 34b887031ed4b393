"""Tests for crvlm_core.core.io: atomic writes leave no temp files and survive a failed replace."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from crvlm_core.core.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, sha256_hex


def test_atomic_write_bytes_creates_parents_and_no_temp(tmp_path):
    dest = tmp_path / "a" / "b" / "f.bin"
    out = atomic_write_bytes(dest, b"hello")
    assert out == dest
    assert dest.read_bytes() == b"hello"
    assert os.listdir(dest.parent) == ["f.bin"]
    atomic_write_bytes(dest, b"again")
    assert dest.read_bytes() == b"again"
    assert os.listdir(dest.parent) == ["f.bin"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    dest = tmp_path / "f.json"
    atomic_write_json(dest, {"v": 1})

    def boom(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_json(dest, {"v": 2})
    assert json.loads(dest.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_write_json_sorted_indented(tmp_path):
    dest = tmp_path / "x.json"
    atomic_write_json(dest, {"b": 1, "a": [1, 2]})
    text = dest.read_text()
    assert text == json.dumps({"a": [1, 2], "b": 1}, sort_keys=True, indent=2) + "\n"


def test_atomic_write_json_unserialisable_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert os.listdir(tmp_path) == []


def test_atomic_save_safetensors_round_trip(tmp_path):
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).t()}  # non-contiguous
    dest = tmp_path / "sub" / "t.safetensors"
    atomic_save_safetensors(dest, t, metadata={"k": "v"})
    back = load_file(dest)
    assert torch.equal(back["w"], t["w"])
    with safe_open(dest, "pt") as f:
        assert f.metadata() == {"k": "v"}
    assert os.listdir(dest.parent) == ["t.safetensors"]


def test_sha256_hex_stable_and_framed():
    # No parts: digest of the empty message. One part: 8-byte little-endian length, then the bytes.
    assert sha256_hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_hex("abc") == "ce91dc5eec0139adf091900d225971d6ad246a845bad791b5693a9d0d55dd391"
    assert sha256_hex("abc") == sha256_hex(b"abc")
    assert sha256_hex("ab", "c") != sha256_hex("a", "bc")
    assert len(sha256_hex("x")) == 64
    with pytest.raises(TypeError):
        sha256_hex(3)  # type: ignore[arg-type]


def test_atomic_save_safetensors_is_byte_identical_across_processes(tmp_path):
    """The same tensors + metadata give the same bytes (#24): safetensors' own metadata order varies by process,
    so each save runs in a fresh interpreter and the files must match; the metadata reads back unchanged."""
    import subprocess
    import sys

    script = ("import sys, torch; from crvlm_core.core.io import atomic_save_safetensors as s; "
              "s(sys.argv[1], {'b': torch.arange(4.0), 'a': torch.ones(2, 3)}, "
              "metadata={k: k * 2 for k in 'zyxwvutsrq'} | {'format_version': '1', 'é': 'ü'})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", script, str(p)], check=True)
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[2]
    with safe_open(paths[0], "pt") as f:
        assert f.metadata() == {**{k: k * 2 for k in "zyxwvutsrq"}, "format_version": "1", "é": "ü"}
    size = int.from_bytes(data[0][:8], "little")
    header = json.loads(data[0][8:8 + size])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])  # (safe_open's dict has no order)
    back = load_file(paths[0])
    assert torch.equal(back["b"], torch.arange(4.0)) and torch.equal(back["a"], torch.ones(2, 3))
    assert (8 + size) % 8 == 0  # the header keeps safetensors' alignment
    atomic_save_safetensors(tmp_path / "same.safetensors", {"b": torch.arange(4.0), "a": torch.ones(2, 3)},
                            metadata={"format_version": "1", "é": "ü", **{k: k * 2 for k in "qrstuvwxyz"}})
    assert (tmp_path / "same.safetensors").read_bytes() == data[0]  # the caller's key order does not matter
