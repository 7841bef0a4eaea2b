"""At the real default settings, every teacher beats the student on bits-per-byte by a clear margin.

Builds the default zoo into this test session's cache (``$MLOT_DS_TEST_CACHE`` to reuse one between
sessions), never into the user's own ``~/.cache/mlot_ds``.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlot_ds.data.dialogsum import read_records, reference_summaries
from mlot_ds.eval import bits_per_byte
from mlot_ds.zoo import MEMBERS, TEACHERS, ZooSettings, build_zoo, render_context, render_response, zoo_report_path

CLEAR_MARGIN = 0.15
"""A teacher's bits-per-byte must be at least this fraction below the student's."""


@pytest.mark.slow
def test_default_teachers_clearly_beat_the_student():
    settings = ZooSettings()
    paths = build_zoo(settings, progress=False)
    report = json.loads(zoo_report_path(settings).read_text())
    test = read_records("test")[: settings.resolved().eval_dialogues]
    pairs = [(render_context(r["dialogue"]), render_response(s)) for r in test for s in reference_summaries(r)]

    # Recompute from the saved checkpoints: the report must describe what was written to disk. One
    # thread, like the build itself (and far faster than two on a busy 2-core machine).
    measured = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for member in MEMBERS:
            model = AutoModelForCausalLM.from_pretrained(paths[member])
            tokenizer = AutoTokenizer.from_pretrained(paths[member])
            measured[member] = bits_per_byte(
                model, tokenizer, [c for c, _ in pairs], [r for _, r in pairs], batch_size=16, device="cpu"
            )
            assert measured[member] == pytest.approx(report["bits_per_byte"][member], abs=1e-3), member
    finally:
        torch.set_num_threads(threads)

    student = measured["student"]
    assert student < report["student_untrained_bits_per_byte"], "student pretraining did not help"
    for teacher in TEACHERS:
        margin = 1 - measured[teacher] / student
        assert margin >= CLEAR_MARGIN, f"{teacher}: {measured[teacher]:.3f} bpb vs student {student:.3f} (margin {margin:.1%})"
    # Teachers are different models, not copies: their scores differ.
    assert len({round(measured[t], 3) for t in TEACHERS}) == len(TEACHERS)
