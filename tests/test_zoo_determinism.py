"""Same settings, same artefacts; concurrent builders never build a member twice."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mlot_ds.data.dialogsum import read_records
from mlot_ds.zoo import MEMBERS, PROFILES, ZooSettings, build_zoo
from mlot_ds.zoo.tokenizer_training import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_tokenizer_training_is_deterministic():
    texts = [t for r in read_records("train")[:150] for t in (r["dialogue"], r["summary"])]
    for member in MEMBERS:
        vocab_size = PROFILES["tiny"].members[member].vocab_size
        first = train_tokenizer(member, texts, vocab_size, 128)
        second = train_tokenizer(member, texts, vocab_size, 128)
        assert first.get_vocab() == second.get_vocab(), member
        assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str(), member
        assert len(first) == vocab_size, member


def test_same_settings_give_identical_artefacts(tmp_path):
    settings = ZooSettings(profile="tiny", members={member: {"pretrain_steps": 2, "tune_steps": 1} for member in MEMBERS})
    # Worker processes and an in-process build must agree: both train every member on one thread.
    first = build_zoo(settings, cache_dir=tmp_path / "a", progress=False, workers=2)
    second = build_zoo(settings, cache_dir=tmp_path / "b", progress=False, workers=1)
    other_seed = build_zoo(dataclasses.replace(settings, seed=1), cache_dir=tmp_path / "c", progress=False, workers=1)
    for member in MEMBERS:
        assert (first[member] / "tokenizer.json").read_bytes() == (second[member] / "tokenizer.json").read_bytes()
        weights_a, weights_b = load_file(first[member] / "model.safetensors"), load_file(second[member] / "model.safetensors")
        assert weights_a.keys() == weights_b.keys()
        assert all((weights_a[name] == weights_b[name]).all() for name in weights_a), member
        weights_c = load_file(other_seed[member] / "model.safetensors")
        assert any(
            weights_a[name].shape != weights_c[name].shape or not (weights_a[name] == weights_c[name]).all()
            for name in weights_a
        ), f"{member}: a different seed gave the same weights"


@pytest.mark.slow
def test_concurrent_processes_build_each_member_once(tmp_path):
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        from mlot_ds.zoo import ZooSettings, build_zoo
        build_zoo(ZooSettings(profile="tiny"), cache_dir=sys.argv[1], progress=False)
        """
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    # Members are built in worker processes that log to the inherited stderr.
    built_lines = [line for output in outputs for line in "".join(output).splitlines() if line.startswith("zoo: built ")]
    assert sorted(Path(line.removeprefix("zoo: built ")).name for line in built_lines) == sorted(MEMBERS)
    root = tmp_path / "zoo" / ZooSettings(profile="tiny").fingerprint()
    assert not list(root.glob(".tmp-*"))
    report = json.loads((root / "report.json").read_text())
    assert set(report["bits_per_byte"]) == set(MEMBERS)
