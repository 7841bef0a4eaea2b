"""tools/reproduce.py: the report arithmetic on hand-made runs, the PNG, and ``--quick`` end to end."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, job_env, run_job


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's header (the chart itself is matplotlib's)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def hand_run(name="unit"):
    rows = [
        {"setting": "reference", "method": "Teacher llama", "seed": 0, "exit": 0, "seconds": 1.0,
         "eval/rouge_lsum": 30.0, "eval/bits_per_byte": 1.0},
        {"setting": "labeled", "method": "sft", "seed": 0, "exit": 0, "seconds": 2.0, "eval/rouge_lsum": 10.0, "eval/bits_per_byte": 3.0},  # noqa: E501
        {"setting": "labeled", "method": "sft", "seed": 1, "exit": 0, "seconds": 4.0, "eval/rouge_lsum": 14.0, "eval/bits_per_byte": 3.0},  # noqa: E501
        {"setting": "labeled", "method": "uld", "seed": 0, "exit": 0, "seconds": 2.0, "eval/rouge_lsum": 22.0, "eval/bits_per_byte": 2.0},  # noqa: E501
        {"setting": "labeled", "method": "uld", "seed": 1, "exit": 1, "seconds": 2.0},
    ]
    scale = {"zoo_profile": "tiny", "zoo_members": {"student": {"vocab_size": 3, "hidden_size": 4, "num_layers": 1,
                                                                "pretrain_steps": 1, "tune_steps": 0}},
             "seeds": 2, "steps": 5, "micro_batch": 2, "lr": 1e-3, "train_records": 10, "eval_records": 4,
             "max_new_tokens": 8, "max_length": 128, "teacher": "llama"}
    return {"name": name, "command": "python tools/reproduce.py --unit", "scale": scale, "rows": rows, "wall_minutes": 1.0,
            "load_average": {"start": [1.0, 1.0, 1.0], "end": [2.0, 2.0, 2.0]}, "plan": {"labeled": ["sft", "uld"]},
            "teacher": "llama", "methods": {"sft": "SFT", "uld": "ULD"}}


def test_report_means_spreads_gap_and_kept_analysis(tmp_path):
    report = load_tool("reproduce_report")
    (tmp_path / "unit.md").write_text("# old\n\n## Analysis\n\nHand-written text.\n")
    paths = report.write_report(tmp_path, hand_run())
    text = (tmp_path / "unit.md").read_text()
    # SFT: mean 12, sample std of (10, 14) = 2.83; ULD: one finished run of two, no spread.
    assert "| labeled | SFT | 2 | 12.00 ± 2.83 | 3.000 ± 0.000 | n/a | +0% | +0% | 3 |" in text
    # ULD closes (22 - 12) / (30 - 12) = 56% of the ROUGE gap and (2 - 3) / (1 - 3) = 50% in bits per byte;
    # its one finished seed is 2.0 - 3.0 = -1 bit per byte from SFT's run of the same seed.
    assert "| labeled | ULD | 2 (1 failed) | 22.00 | 2.000 | -1.0000 | +56% | +50% | 2 |" in text
    assert "Labeled ranking by mean ROUGE-LSum: ULD (22.00) > SFT (12.00)" in text
    assert text.endswith("## Analysis\n\nHand-written text.\n") and "# old" not in text
    assert json.loads((tmp_path / "unit.json").read_text())["rows"][0]["method"] == "Teacher llama"
    width, height = png_size(tmp_path / "unit.png")
    assert tmp_path / "unit.png" in paths and width > 300 and height > 50


def test_paired_differences_use_the_baseline_run_of_the_same_seed():
    report = load_tool("reproduce_report")
    rows = [{"setting": "labeled", "method": method, "seed": seed, "exit": 0, "eval/bits_per_byte": value}
            for method, values in (("sft", (3.0, 5.0, 4.0)), ("kd", (2.5, 4.75, 4.0))) for seed, value in enumerate(values)]
    rows.append({"setting": "labeled", "method": "kd", "seed": 7, "exit": 0, "eval/bits_per_byte": 0.0})  # no SFT seed 7
    mean, spread, count = report.paired_differences(rows, "eval/bits_per_byte")[("labeled", "kd")]
    # Differences -0.5, -0.25, 0: mean -0.25, sample std 0.25, although each method spreads by about 1 across seeds.
    assert (mean, count) == (-0.25, 3) and spread == pytest.approx(0.25)


def test_chart_draws_one_bar_per_row_with_signed_values(tmp_path):
    from mlot_ds.eval.chart import Bar, Panel, write_bar_chart

    panels = [Panel("SIGNED", [Bar("A", -1.0, group=0), Bar("B", 1.0, 0.5, group=1)], decimals=3),
              Panel("SECOND", [Bar("C", 2.0)])]
    path = write_bar_chart(tmp_path / "signed.png", panels, bar_width=200)
    width, height = png_size(path)
    assert width > 200 and height > 50
    with pytest.raises(ValueError, match="no bars"):
        write_bar_chart(tmp_path / "none.png", [Panel("EMPTY")])


@pytest.mark.slow
def test_quick_reproduction_end_to_end(tiny_zoo, tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    result = run_job([sys.executable, str(REPO / "tools" / "reproduce.py"), "--quick", "--out-dir", str(out),
                      "--work-dir", str(work)], job_env(tiny_zoo), tmp_path / "reproduce.log", timeout=600)
    assert result.returncode == 0, result.log_text[-4000:]
    run = json.loads((out / "quick.json").read_text())
    trained = [row for row in run["rows"] if row["setting"] == "labeled"]
    assert [row["method"] for row in trained] == ["sft", "seqkd", "mlot-default"]
    for row in run["rows"]:
        assert row["exit"] == 0 and 0 < row["eval/bits_per_byte"] < 16 and 0 <= row["eval/rouge_lsum"] <= 100
    text = (out / "quick.md").read_text()
    for needle in ("| reference | Origin |", "| reference | Teacher llama |", "| labeled | SFT |", "| labeled | SeqKD |",
                   "| labeled | MLOT (default) |", "python tools/reproduce.py --quick", "Zoo profile `tiny`"):
        assert needle in text
    png_size(out / "quick.png")
    # SeqKD trained on the teacher's generations, written by tools/generate_teacher_responses.py.
    generated = list((work / "data").glob("llama.train*.jsonl"))
    assert len(generated) == 1 and generated[0].read_text().strip()
    seqkd_recipe = (work / "labeled" / "seqkd" / "seed0" / "recipe.yaml").read_text()
    assert str(generated[0]) in seqkd_recipe


def test_every_reproduction_method_is_a_valid_recipe(tmp_path):
    """Each method's recipe (ablations, SFT, presets) loads and validates; the ablation knobs are recipe fields."""
    import yaml

    from mlot_ds.config import load_recipe
    from mlot_ds.zoo.settings import PROFILES

    tool = load_tool("reproduce")
    args = tool.parse_args(["--ablation", "--work-dir", str(tmp_path)])
    data_paths = {"gold": {"adapter": "dialogsum", "path": "builtin:dialogsum/train", "limit": 8},
                  "teacher": {"adapter": "dialogsum", "path": "builtin:dialogsum/train", "limit": 8}}
    members = PROFILES["default"].members
    for key, method in tool.METHODS.items():
        raw = tool.recipe_for(args, "labeled", key, 0, data_paths, tmp_path / key)
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(raw))
        recipe = load_recipe(path)
        loss = recipe.teachers[0].loss
        if method.ce_only:
            assert loss.kind == "uld" and loss.weights == {"uld": 0.0}, key
        assert loss.weights == ({"uld": 0.0} if method.ce_only else dict(method.weights)), key
    smaller = min(members["student"].vocab_size, members["teacher-llama"].vocab_size)
    ad_tr = load_recipe(tmp_path / "ablation-ad-tr.yaml").teachers[0].loss
    assert (ad_tr.params.ranking, ad_tr.params.k) == ("token", smaller) and ad_tr.weights == {"sl": 0.0, "sd": 0.0}
    assert args.plan == tool.ABLATION_PLAN and args.name == "dialogsum-default-ablation"


def real_tool():
    load_tool("reproduce_report")
    return load_tool("reproduce_real")


def test_every_real_teacher_run_is_a_valid_recipe(tmp_path):
    """Each method of the real-teacher plan, and each sweep variant, loads and validates as a recipe with
    the weights, k, lr and steps it names; the caches it reads are the ones the cache build writes."""
    import argparse

    import yaml

    from mlot_ds.config import load_recipe
    from mlot_ds.losses.registry import METHODS as LOSSES

    tool = real_tool()
    args = argparse.Namespace(eval_limit=4, max_length=256, micro_batch=4, steps=100, lr=1e-3, max_new_tokens=8,
                              work_dir=str(tmp_path))
    data = {"adapter": "dialogsum", "path": "builtin:dialogsum/train", "limit": 8}
    keys = [*tool.METHODS, "mlot-default+w=0.1", "mlot-paper+w=2", "alm+ce=0.5", "kl+k=16", "mlot-default+k=10+lr=3e-4+steps=40"]
    cached = set(tool.cache_names("smol", keys))
    assert {"mlot", "kl", "kl-k16", "mlot-k10", "alm", "qwen", "opt"} <= cached
    for key in keys:
        run = tool.planned(key)
        for student in run.method.students:
            raw = tool.run_recipe(args, student, "labeled", key, 0, data, tmp_path)
            path = tmp_path / f"{student}-{key}.yaml"
            path.write_text(yaml.safe_dump(raw))
            recipe = load_recipe(path)
            scale = run.variant.get("w", 1.0)
            for teacher in recipe.teachers:
                if run.method.live is not None:
                    assert teacher.source == "live" and teacher.loss.kind == "official"
                    continue
                assert teacher.source == "cache" and teacher.cache_dir.split("/")[-1] in cached | {"kl"}
                defaults = LOSSES[teacher.loss.kind].default_weights(teacher.loss.params)
                expected = {t: 0.0 if run.method.ce_only else dict(defaults, **dict(run.method.weights))[t] * scale
                            for t in defaults}
                assert teacher.loss.weights == pytest.approx(expected), key
            assert recipe.train.lr == run.variant.get("lr", 1e-3) and recipe.train.max_steps == run.variant.get("steps", 100)
            assert recipe.train.ce_weight == run.variant.get("ce", run.method.ce_weight)
    ten = tool.run_recipe(args, "wide", "labeled", "mlot-default+k=10+lr=3e-4+steps=40", 0, data, tmp_path)
    assert ten["teachers"][0]["loss"]["k"] == 10 and ten["teachers"][0]["cache_dir"].endswith("mlot-k10")
    assert tool.planned("mlot-default+k=10+lr=3e-4+steps=40").baseline == "sft+lr=0.0003+steps=40"
    assert tool.run_recipe(args, "smol", "labeled", "kl+k=16", 0, data, tmp_path)["teachers"][0]["loss"]["top_k"] == 16
    with pytest.raises(SystemExit, match="k= needs"):
        tool.planned("alm+k=5").caches()
    for bad in ("nope", "sft+x=1", "sft+lr=fast"):
        with pytest.raises(SystemExit, match="--real-methods"):
            tool.planned(bad)


def test_real_teacher_differences_take_the_sft_run_of_the_same_seed_and_variant():
    tool = real_tool()
    values = {("sft", 0): 2.0, ("sft", 1): 2.2, ("kl", 0): 1.8, ("kl", 1): 2.1, ("sft+lr=0.0003", 0): 3.0,
              ("mlot-default+lr=0.0003", 0): 2.9, ("mlot-default", 0): 1.95, ("mlot-default", 1): 2.3}
    rows = [{"setting": "smol-labeled", "method": m, "seed": s, "exit": 0, "eval/bits_per_byte": v}
            for (m, s), v in values.items()]
    found = tool.same_seed_differences(rows, "smol-labeled")
    # kl: -0.2 and -0.1; mlot-default: -0.05 and +0.1; the lr variant against SFT at that lr: -0.1 (not 0.9).
    assert found["kl"][0] == pytest.approx(-0.15) and found["kl"][2] == 2
    assert found["mlot-default"][0] == pytest.approx(0.025)
    assert found["mlot-default+lr=0.0003"] == (pytest.approx(-0.1), None, 1)
    # Shares: mlot-default lost 0.025 against a KL gain of 0.15; the lr variant has no KL run of its own.
    assert tool.share_of_kl_gain("mlot-default", found["mlot-default"], found) == "-17%"
    assert tool.share_of_kl_gain("mlot-default+lr=0.0003", found["mlot-default+lr=0.0003"], found) == "n/a"
    flat = {"kl": (-0.004, None, 1), "uld": (0.03, None, 1)}
    assert tool.share_of_kl_gain("uld", flat["uld"], flat) == "n/a (KL gain +0.004)"
