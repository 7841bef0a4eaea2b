"""The recipe loader, overrides, validation, and the DeepSpeed config filling."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from mlot_ds.config import DEFAULT_RECIPE, Recipe, RecipeError, apply_override, load_recipe
from mlot_ds.engine.cli import main as cli_main
from mlot_ds.engine.ds_config import DeepSpeedConfigError, read_ds_config, student_ds_config
from mlot_ds.teachers.loading import teacher_ds_config

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "ds_configs" / "zero3.json"


def base_recipe() -> dict:
    return yaml.safe_load(DEFAULT_RECIPE.read_text())


def write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_embedded_default_loads_and_has_three_teachers_with_distinct_models():
    recipe = load_recipe()
    assert isinstance(recipe, Recipe)
    assert [t.name for t in recipe.teachers] == ["llama", "qwen", "opt"]
    assert len({t.model for t in recipe.teachers}) == 3
    assert recipe.student.model == "zoo:student"


def test_overrides_by_dotted_path_teacher_name_and_index(tmp_path):
    recipe = load_recipe(write(tmp_path, base_recipe()), [
        "train.max_steps=7", "teachers.qwen.weight=2.5", "teachers.0.loss.preset=paper",
        "teachers.opt.loss.k=20", "weighting.mode=dynamic", "data.eval=null",
    ])
    assert recipe.train.max_steps == 7
    assert recipe.teachers[1].weight == 2.5
    assert recipe.teachers[0].loss.params.preset == "paper"
    assert recipe.teachers[2].loss.params.k == 20 and recipe.teachers[1].loss.params.k == 50
    assert recipe.weighting.mode == "dynamic"
    assert recipe.data.eval is None


def test_override_does_not_touch_other_teachers():
    raw = base_recipe()
    before = copy.deepcopy(raw)
    apply_override(raw, "teachers.llama.weight=3")
    assert raw["teachers"][0]["weight"] == 3
    assert raw["teachers"][1:] == before["teachers"][1:]


BAD_RECIPES = [
    # (mutation of the raw recipe, text the error must contain)
    (lambda r: r["train"].update(max_step=5), "train.max_step: unknown field; did you mean 'max_steps'"),
    (lambda r: r["train"].update(lr=-1.0), "train.lr: expected a positive number"),
    (lambda r: r["train"].update(micro_batch_size=0), "train.micro_batch_size: expected an integer >= 1"),
    (lambda r: r["train"].update(micro_batch_size="four"), "train.micro_batch_size: expected an integer"),
    (lambda r: r["train"].update(grad_accum=1.5), "train.grad_accum: expected an integer"),
    (lambda r: r["teachers"][1].update(pairing="byte"), "teachers[1].pairing: expected one of position, offsets, dtw"),
    (lambda r: r["teachers"][0]["loss"].update(preset="offical"), "teachers[0].loss.preset: expected one of"),
    (lambda r: r["teachers"][0]["loss"].update(kind="klx"), "teachers[0].loss.kind: expected one of mlot, official, uld, mined"),
    (lambda r: r["teachers"][2].update(placement="gpu"), "teachers[2].placement: expected one of shard, offload, replicate"),
    (lambda r: r["teachers"][1].update(name="llama"), "teachers[1].name: duplicate teacher name 'llama'"),
    (lambda r: r["teachers"][0].update(weight=-1), "teachers[0].weight: expected a non-negative number"),
    (lambda r: r.update(teachers=[]), "teachers: expected at least one teacher"),
    (lambda r: [t.update(weight=0) for t in r["teachers"]], "weights (priors) must not all be zero"),
    (lambda r: r["teachers"][0].update(loss={"kind": "mined"}), "teachers[0].pairing: loss 'mined' needs pairing 'dtw'"),
    (lambda r: r["teachers"][0].update(loss={"kind": "uld", "preset": "paper"}), "teachers[0].loss.preset: not a parameter of loss 'uld'"),  # noqa: E501
    (lambda r: r["weighting"].update(mode="adaptive"), "weighting.mode: expected one of static, dynamic"),
    (lambda r: r["weighting"].update(temperature=0), "weighting.temperature: expected a positive number"),
    (lambda r: r["data"].update(max_length=4), "data.max_length: expected an integer >= 16"),
    (lambda r: r["data"].update(bad_rows="ignore"), "data.bad_rows: expected one of error, skip"),
    (lambda r: r["data"]["train"].update(adapter="squad"), "data.train.adapter: expected one of"),
    (lambda r: r["data"]["train"].update(path="/nonexistent/x.jsonl"), "data.train.path: no such file or folder"),
    (lambda r: r["data"]["train"].update(path="builtin:squad/train"), "unknown built-in data"),
    (lambda r: r["student"].update(dtype="fp8"), "student.dtype: expected one of auto, float32, bfloat16, float16"),
    (lambda r: r["student"].update(model="zoo:gpt9"), "student.model: unknown zoo member 'gpt9'"),
    (lambda r: r["student"]["template"].update(kind="alpaca"), "student.template.kind: expected one of plain, chat"),
    (lambda r: r["teachers"][0].update(model="/nonexistent/teacher"), "teachers[0].model: model folder not found"),
    (lambda r: r["teachers"][0]["loss"].update(kk=3), "teachers[0].loss.kk: unknown field; did you mean 'k'?"),
    (lambda r: r["teachers"][0]["loss"].update(ranking="word"), "teachers[0].loss.ranking: expected one of sequence, token"),
    (lambda r: r["teachers"][0]["loss"].update(overrides={"k": 0}), "teachers[0].loss.k: expected an integer >= 1"),
    (lambda r: r["teachers"][0]["loss"].update(k=0), "teachers[0].loss.k: expected an integer >= 1"),
    (lambda r: r["teachers"][0].update(loss={"kind": "official", "ranking": "token"}),
     "teachers[0].loss.ranking: not a parameter of loss 'official'"),
    (lambda r: r["teachers"][1].update(source="cache", loss={"kind": "mlot", "ranking": "token"}),
     "teachers[1].source: 'cache' cannot serve loss 'mlot': a cache stores one ranking per record"),
    (lambda r: r["teachers"][0]["loss"].update(weights={"uld": 1.0}), "teachers[0].loss.weights.uld: loss 'mlot' has the terms had, sl, sd"),  # noqa: E501
    (lambda r: r["teachers"][0]["loss"].update(weights={"sd": -0.5}), "teachers[0].loss.weights.sd: expected a non-negative number"),  # noqa: E501
    (lambda r: r["teachers"][2].update(loss={"kind": "uld", "weights": {"had": 1}}), "teachers[2].loss.weights.had: loss 'uld' has the terms uld"),  # noqa: E501
    (lambda r: r["teachers"][0].update(pairing="dtw", loss={"kind": "mined", "tau": 2.0}),
     "teachers[0].loss.tau: unknown field; valid fields: temperature"),
    (lambda r: r["teachers"][0]["loss"].update(weights=[0.1]), "teachers[0].loss.weights: expected a mapping"),
    (lambda r: r["teachers"][0].update(source="cache", loss={"kind": "official"}),
     "teachers[0].source: 'cache' cannot serve loss 'official'"),
    (lambda r: r["teachers"][1].update(source="cache", cache_dir="/nonexistent/cache"),
     "teachers[1].source: 'cache' but /nonexistent/cache/manifest.json does not exist"),
    (lambda r: r["eval"].update(best_metric="eval/bleu", every=5), "eval.best_metric: expected one of"),
    (lambda r: r["eval"].update(best_metric="eval/rouge_lsum", every=0), "eval.best_metric: needs periodic evaluation"),
    (lambda r: r.update(student="zoo:student"), "student: expected a mapping"),
    (lambda r: r["eval"].update(limit=0), "eval.limit: expected an integer >= 1"),
]


@pytest.mark.parametrize("mutate,expected", BAD_RECIPES, ids=[e for _, e in BAD_RECIPES])
def test_dry_run_reports_one_clear_error_per_bad_field(tmp_path, capsys, mutate, expected):
    raw = base_recipe()
    mutate(raw)
    code = cli_main(["--config", str(ZERO3), "--recipe", str(write(tmp_path, raw)), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert err.count("error:") == 1


def test_dry_run_reports_yaml_syntax_errors_with_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nteachers:\n  - name: a\n   model: b\n")
    assert cli_main(["--config", str(ZERO3), "--recipe", str(path), "--dry-run"]) == 2
    assert f"{path}:4" in capsys.readouterr().err


def test_dry_run_of_the_embedded_default_passes(capsys):
    assert cli_main(["--config", str(ZERO3), "--dry-run"]) == 0
    assert "dry run OK" in capsys.readouterr().out


# --------------------------------------------------------------------------------- DeepSpeed JSON


def test_batch_keys_are_filled_from_the_recipe():
    recipe = load_recipe(None, ["train.micro_batch_size=3", "train.grad_accum=2", "train.grad_clip=0.5",
                                "train.lr=1e-4", "train.warmup_steps=5"])
    config = student_ds_config(read_ds_config(ZERO3), recipe, 4, 100, torch.device("cpu"))
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 3 * 2 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 1e-4
    assert config["scheduler"]["params"]["total_num_steps"] == 100
    assert config["scheduler"]["params"]["warmup_num_steps"] == 5
    assert config["scheduler"]["params"]["warmup_min_lr"] == 0.0
    assert config["bf16"]["enabled"] is False  # fp32 on the CPU


def test_a_conflicting_number_in_the_json_names_both_places(tmp_path):
    raw = json.loads(ZERO3.read_text())
    raw["train_micro_batch_size_per_gpu"] = 8
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    recipe = load_recipe(None, ["train.micro_batch_size=4"])
    expected = r"train_micro_batch_size_per_gpu = 8 conflicts with the recipe's train.micro_batch_size = 4"
    with pytest.raises(DeepSpeedConfigError, match=expected):
        student_ds_config(read_ds_config(path), recipe, 1, 10, torch.device("cpu"), source=str(path))


def test_an_equal_number_in_the_json_is_accepted(tmp_path):
    raw = json.loads(ZERO3.read_text())
    raw["gradient_clipping"] = 1.0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    config = student_ds_config(read_ds_config(path), load_recipe(), 1, 10, torch.device("cpu"))
    assert config["gradient_clipping"] == 1.0


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"zero_optimization": {"stage": 2}}', "zero_optimization.stage must be 3"),
        ('{"zero_optimization": {"stage": 3},\n "fp16": {"enabled": true}}', "fp16.enabled is not supported"),
        ('{"zero_optimization": {"stage": 3},,}', ":1: not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_deepspeed_configs(tmp_path, text, expected):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(DeepSpeedConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_ds_config(path)


def test_every_shipped_ds_config_is_valid_and_fills():
    recipe = load_recipe()
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        config = student_ds_config(read_ds_config(path), recipe, 2, 10, torch.device("cpu"))
        assert config["zero_optimization"]["stage"] == 3, path


def test_teacher_config_has_no_optimizer_and_offloads_only_when_asked():
    student = student_ds_config(read_ds_config(ZERO3), load_recipe(), 1, 10, torch.device("cpu"))
    shard = teacher_ds_config(student, "shard", 4)
    offload = teacher_ds_config(student, "offload", 4)
    assert "optimizer" not in shard and "scheduler" not in shard
    assert shard["zero_optimization"]["stage"] == 3
    assert "offload_param" not in shard["zero_optimization"]
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert shard["train_micro_batch_size_per_gpu"] == 4


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


# ------------------------------------------------------------------- dry runs against real tokenizers


@pytest.fixture
def tiny_zoo_env(tiny_zoo, monkeypatch):
    monkeypatch.setenv("MLOT_DS_CACHE", str(tiny_zoo))
    return tiny_zoo


def test_dry_run_loads_every_tokenizer_of_the_tiny_zoo(tiny_zoo_env, capsys):
    assert cli_main(["--config", str(ZERO3), "--dry-run", "zoo.profile=tiny"]) == 0
    assert "dry run OK" in capsys.readouterr().out


def test_dry_run_rejects_a_chat_template_the_tokenizer_does_not_have(tiny_zoo_env, capsys):
    from transformers import AutoTokenizer

    from mlot_ds.zoo import ZooSettings, zoo_member_path

    kinds = {}
    for member, name in (("teacher-llama", "llama"), ("teacher-qwen", "qwen"), ("teacher-opt", "opt")):
        tok = AutoTokenizer.from_pretrained(zoo_member_path(member, ZooSettings(profile="tiny"), tiny_zoo_env))
        kinds[name] = bool(getattr(tok, "chat_template", None))
    without = [name for name, has in kinds.items() if not has]
    if not without:
        pytest.skip("every tiny-zoo teacher has a chat template")
    name = without[0]
    code = cli_main(["--config", str(ZERO3), "--dry-run", "zoo.profile=tiny", f"teachers.{name}.template.kind=chat"])
    err = capsys.readouterr().err
    assert code == 2 and "template.kind: 'chat' but the tokenizer has no chat template" in err


def test_dry_run_rejects_a_tokenizer_larger_than_the_model(tiny_zoo_env, tmp_path, capsys):
    # The student's tokenizer paired with a model that has fewer embedding rows than tokens.
    from mlot_ds.zoo import ZooSettings, zoo_member_path

    student = zoo_member_path("student", ZooSettings(profile="tiny"), tiny_zoo_env)
    small = tmp_path / "small-model"
    small.mkdir()
    config = json.loads((student / "config.json").read_text())
    config["vocab_size"] = 8
    (small / "config.json").write_text(json.dumps(config))
    (small / "model.safetensors").symlink_to(student / "model.safetensors")  # a dry run reads only its header
    code = cli_main(
        ["--config", str(ZERO3), "--dry-run", "zoo.profile=tiny", f"student.model={small}", f"student.tokenizer={student}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "student.tokenizer" in err and "embedding rows" in err


def test_loss_weights_replace_the_preset_weights_term_by_term():
    from mlot_ds.losses import METHODS, PRESETS
    from mlot_ds.losses.mlot import MlotParams

    default = PRESETS["default"].weights
    mlot = METHODS["mlot"](MlotParams(), {"sl": 0, "sd": 0.25})
    assert mlot.term_weights == {"had": default["had"], "sl": 0.0, "sd": 0.25}
    assert METHODS["mlot"](MlotParams(preset="paper")).term_weights == dict(PRESETS["paper"].weights)
    assert METHODS["uld"]().term_weights == {"uld": 1.5}
    assert METHODS["uld"](None, {"uld": 0}).term_weights == {"uld": 0.0}
    token = METHODS["mlot"](MlotParams(ranking="token", k=7))
    assert (token.preset.ranking, token.preset.k) == ("token", 7)


def test_loss_weights_and_parameters_load_from_dotted_overrides():
    recipe = load_recipe(None, ["teachers.llama.loss.weights.sl=0", "teachers.llama.loss.ranking=token"])
    assert recipe.teachers[0].loss.weights == {"sl": 0}
    assert recipe.teachers[0].loss.params.ranking == "token"
    assert recipe.teachers[1].loss.weights == {} and recipe.teachers[1].loss.params.ranking == "sequence"


def test_recipes_of_the_earlier_format_still_load_with_a_warning(tmp_path):
    raw = base_recipe()
    raw["teachers"][0]["loss"] = {"kind": "mlot", "preset": "official", "overrides": {"k": 20}}
    raw["teachers"][1]["loss"] = {"kind": "mlot", "preset": "paper", "overrides": {"ranking": "token"}, "weights": {"sd": 0}}
    raw["teachers"][2].update(pairing="position", loss={"kind": "uld", "preset": "default", "overrides": {}})
    with pytest.warns(UserWarning, match="now 'kind: official'"):
        recipe = load_recipe(write(tmp_path, raw))
    first, second, third = (t.loss for t in recipe.teachers)
    assert (first.kind, first.params.k) == ("official", 20)
    assert (second.kind, second.params.preset, second.params.ranking, second.weights) == ("mlot", "paper", "token", {"sd": 0})
    assert third.kind == "uld"


def test_a_recipe_round_trips_through_its_plain_form(tmp_path):
    recipe = load_recipe(
        None,
        [
            "teachers.llama.loss={kind: official, k: 9}",
            "teachers.qwen.loss.tau_sd=3.0",
            "teachers.opt.loss={kind: uld, weights: {uld: 0.5}}",
            "teachers.opt.pairing=position",
        ],
    )
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert load_recipe(path) == recipe
