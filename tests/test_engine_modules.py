"""The engine's trainable modules and feature hooks, without a DeepSpeed job: deterministic initialisation,
parameter groups and per-group schedules, the checkpoint's module manifest, the projectors folder, and
features captured by hooks equal to what the models return when asked for everything (eager attention)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from deepspeed.runtime import lr_schedules

from mlot_ds import outputs
from mlot_ds.config import TeacherConfig
from mlot_ds.engine import checkpoint
from mlot_ds.engine import modules as trainable
from mlot_ds.losses import METHODS, MethodContext, TeacherView
from mlot_ds.losses.method import (
    EMBEDDINGS,
    HIDDEN,
    OUTPUT_WEIGHT,
    LinearSpec,
    LogitSource,
    Method,
    TeacherOutput,
    attention,
    layer_output,
)
from mlot_ds.pairing import ModelBatch, position_pairing
from mlot_ds.teachers.features import (
    FeatureCapture,
    FeatureError,
    gathered_output_weight,
    model_dims,
    parse_feature,
)
from mlot_ds.teachers.pool import Teacher, TeacherPool

MANIFEST = {"llama": {"query": {"in_features": 12, "out_features": 20, "bias": True, "init": "uniform", "lr": 1e-3,
                                "lr_scale": 1.0},
                      "t2s": {"in_features": 10, "out_features": 6, "bias": True, "init": "uniform", "lr": 1e-3,
                              "lr_scale": 1.0}},
            "qwen": {"latents": {"in_features": 300, "out_features": 400, "bias": True, "init": "lecun_normal",
                                 "lr": None, "lr_scale": 2.0}}}


# ------------------------------------------------------------------------------------ modules


def test_no_registered_method_declares_modules_or_features_unless_asked():
    """With their default settings (ALM: latents off) the engine adds nothing for these methods: no
    module, no hook, every returned term over the method's one denominator (issue 16's bit-for-bit rule)."""
    context = MethodContext()
    methods = {kind: cls(None, None, context) for kind, cls in METHODS.items() if kind not in ("dskd", "emo")}
    for kind, method in methods.items():
        assert method.module_specs() == {} and method.teacher_features() == frozenset(), kind
        assert method.student_features() == frozenset(), kind
        assert method.needs_for(method.params) == type(method).needs, kind
        defaults = type(method).default_weights(method.params)
        assert all(method.term_denominator(t) == type(method).denominator for t in defaults), kind
    assert trainable.module_manifest(methods) == {}


def test_modules_are_initialised_the_same_whatever_the_global_rng():
    torch.manual_seed(0)
    first = trainable.build_modules(MANIFEST, seed=7, dtype=torch.float32)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    expected = torch.get_rng_state()
    second = trainable.build_modules(MANIFEST, seed=7, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), expected)  # the build draws nothing from the global RNG
    torch.set_rng_state(state)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    other = trainable.build_modules(MANIFEST, seed=8, dtype=torch.float32)
    assert not torch.equal(other["llama"]["query"].weight, first["llama"]["query"].weight)
    assert not torch.equal(first["llama"]["t2s"].weight[:6, :10], first["llama"]["query"].weight[:6, :10])
    assert trainable.build_modules(MANIFEST, seed=7, dtype=torch.bfloat16)["llama"]["query"].weight.dtype == torch.bfloat16


def test_the_two_initialisations_have_their_reference_distributions():
    tree = trainable.build_modules(MANIFEST, seed=1, dtype=torch.float64)
    query = tree["llama"]["query"]
    bound = 1 / math.sqrt(12)  # torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    assert query.weight.abs().max() <= bound and query.weight.abs().max() > 0.9 * bound
    assert query.bias.abs().max() <= bound and query.bias.abs().max() > 0.5 * bound
    latents = tree["qwen"]["latents"]  # flax Dense: truncated normal, variance 1 / fan_in, zero bias
    assert latents.weight.std().item() == pytest.approx(1 / math.sqrt(300), rel=0.02)
    assert latents.weight.abs().max().item() <= 2 * (1 / math.sqrt(300)) / 0.87962566103423978 + 1e-12
    assert torch.equal(latents.bias, torch.zeros(400, dtype=torch.float64))


def test_parameter_groups_keep_the_student_first_and_give_each_module_its_rate():
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    frozen = torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    student.add_module("frozen", frozen)
    before = [p for p in student.parameters() if p.requires_grad]
    trainable.attach(student, trainable.build_modules(MANIFEST, seed=0, dtype=torch.float32))
    groups, ratios = trainable.parameter_groups(student, MANIFEST, base_lr=5e-4)
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in before] and "lr" not in groups[0]
    assert [g["lr"] for g in groups[1:]] == [1e-3, 1e-3, 1e-3] and ratios == [1.0, 2.0, 2.0, 2.0]
    assert trainable.group_ratios(MANIFEST, 5e-4) == ratios  # known before any model is loaded
    assert sum(len(g["params"]) for g in groups) == len([p for p in student.parameters() if p.requires_grad])
    with pytest.raises(trainable.ModuleConfigError, match="already has a submodule"):
        trainable.attach(student, torch.nn.ModuleDict())


@pytest.mark.parametrize("kind", ["WarmupDecayLR", "WarmupLR", "WarmupCosineLR"])
def test_every_group_follows_the_student_schedule_scaled_by_its_ratio(kind):
    params = {"WarmupDecayLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-4, "warmup_num_steps": 3, "total_num_steps": 10},
              "WarmupLR": {"warmup_min_lr": 1e-5, "warmup_max_lr": 5e-4, "warmup_num_steps": 3},
              "WarmupCosineLR": {"warmup_num_steps": 3, "total_num_steps": 10}}[kind]
    config = {"scheduler": {"type": kind, "params": dict(params)}}
    trainable.scale_schedule(config, [1.0, 2.0, 4.0])
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.AdamW([{"params": [weights[0]]}, {"params": [weights[1]], "lr": 1e-3},
                                   {"params": [weights[2]], "lr": 2e-3}], lr=5e-4)
    scheduler = getattr(lr_schedules, kind)(optimizer, **config["scheduler"]["params"])
    seen = []
    for _ in range(8):
        rates = [group["lr"] for group in optimizer.param_groups]
        assert rates[1] == pytest.approx(2 * rates[0], rel=1e-12) and rates[2] == pytest.approx(4 * rates[0], rel=1e-12)
        seen.append(rates[0])
        optimizer.step()
        scheduler.step()
    assert len(set(seen)) > 2  # the schedule moves


def test_schedules_that_cannot_scale_per_group_are_refused():
    with pytest.raises(trainable.ModuleConfigError, match="scheduler.type 'OneCycle' cannot give the trainable modules"):
        trainable.scale_schedule({"scheduler": {"type": "OneCycle", "params": {}}}, [1.0, 2.0], source="ds.json")
    with pytest.raises(trainable.ModuleConfigError, match="warmup_max_lr is a list"):
        trainable.scale_schedule({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": [1, 2]}}}, [1.0, 2.0])
    config = {}
    trainable.scale_schedule(config, [1.0, 2.0])  # no scheduler: every group keeps its own rate
    assert config == {}


def test_nan_touch_reaches_every_module():
    tree = trainable.build_modules(MANIFEST, seed=0, dtype=torch.float32)
    value = trainable.nan_touch(tree)
    assert math.isnan(value.item())
    value.backward()
    assert all(p.grad is not None and torch.isnan(p.grad).all() for p in tree.parameters())


# --------------------------------------------------------------------------- checkpoints, export


def _fake_checkpoint(folder, modules=None):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "world_size": 1, "steps_per_epoch": 5}))
    (folder / "teachers.json").write_text(json.dumps({"teachers": []}))
    (folder / checkpoint.COMPLETE).write_text("ok\n")
    trainable.write_manifest(folder, modules or {})
    return folder


def test_a_resume_must_declare_the_modules_it_was_saved_with(tmp_path):
    with_modules = _fake_checkpoint(tmp_path / "a", MANIFEST)
    without = _fake_checkpoint(tmp_path / "b")
    assert not (without / trainable.MODULES_FILE).exists()  # no file without modules
    checkpoint.check_compatible(with_modules, {"teachers": []}, False, 1, 5, modules=MANIFEST)
    checkpoint.check_compatible(without, {"teachers": []}, False, 1, 5, modules={})
    changed = json.loads(json.dumps(MANIFEST))
    changed["llama"]["t2s"]["out_features"] = 7
    lr_only = json.loads(json.dumps(MANIFEST))
    lr_only["llama"]["t2s"]["lr"] = 3e-3
    checkpoint.check_compatible(with_modules, {"teachers": []}, True, 1, 5, modules=lr_only)  # a new rate is fine
    for current, now in ((changed, "llama.query [12 -> 20], llama.t2s [10 -> 7]"), ({}, "none")):
        with pytest.raises(checkpoint.CheckpointError) as caught:
            checkpoint.check_compatible(with_modules, {"teachers": []}, True, 1, 5, modules=current)
        message = str(caught.value)
        assert "\n" not in message and "saved with trainable modules llama.query [12 -> 20], llama.t2s [10 -> 6], " \
            "qwen.latents [300 -> 400]" in message and f"this run's losses declare {now}" in message
    with pytest.raises(checkpoint.CheckpointError, match="saved with trainable modules none, but this run's losses"):
        checkpoint.check_compatible(without, {"teachers": []}, False, 1, 5, modules=MANIFEST)


def test_the_projectors_go_beside_the_export_and_nothing_foreign_is_replaced(tmp_path):
    state = {"student.weight": torch.ones(2), "mlot_modules.llama.query.weight": torch.zeros(3, 4),
             "mlot_modules.llama.query.bias": torch.zeros(3)}
    own, modules = trainable.split_state(state)
    assert list(own) == ["student.weight"] and sorted(modules) == ["llama.query.bias", "llama.query.weight"]
    export = tmp_path / "run" / "export"
    folder = trainable.write_projectors(export, modules, MANIFEST, "export.dir")
    assert folder == tmp_path / "run" / "projectors" and outputs.marker_kind(folder) == "projectors"
    assert json.loads((folder / trainable.PROJECTORS_MANIFEST).read_text())["export"] == "export"
    trainable.write_projectors(export, modules, MANIFEST, "export.dir")  # our own earlier output: replaced
    with pytest.raises(outputs.OutputError, match="holds the projectors of the export 'export', not of 'other'"):
        trainable.write_projectors(tmp_path / "run" / "other", modules, MANIFEST, "OUT")
    foreign = tmp_path / "mine" / "projectors"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(outputs.OutputError, match="not empty and was not written as a projectors"):
        trainable.write_projectors(tmp_path / "mine" / "export", modules, MANIFEST, "OUT")
    assert (foreign / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------- features


def tiny(kind: str, attn: str = "sdpa"):
    common = dict(vocab_size=50, num_hidden_layers=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                  num_key_value_heads=2),
        "qwen2": lambda: transformers.Qwen2Config(**common, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                  num_key_value_heads=2),
        "opt": lambda: transformers.OPTConfig(**common, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                              word_embed_proj_dim=32),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                                eos_token_id=0),
    }[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hooked_features_equal_what_the_model_returns_when_asked_for_everything(kind, attn):
    model = tiny(kind, attn)
    eager = tiny(kind, "eager")
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    wanted = {attention(-1), attention(0), HIDDEN, EMBEDDINGS, OUTPUT_WEIGHT, layer_output(0)}
    with torch.no_grad(), FeatureCapture(model, wanted) as capture:
        logits = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        everything = eager(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert set(capture.values) == wanted
    real = mask.bool()[:, :, None] & mask.bool()[:, None, :]
    for layer in (0, -1):
        head_mean = everything.attentions[layer].float().mean(dim=1)
        torch.testing.assert_close(capture.values[attention(layer)][real], head_mean[real], rtol=1e-5, atol=1e-6)
        assert capture.values[attention(layer)].shape == (2, 7, 7)
    torch.testing.assert_close(capture.values[HIDDEN], everything.hidden_states[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(capture.values[layer_output(0)], everything.hidden_states[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(capture.values[EMBEDDINGS], model.get_input_embeddings()(ids))
    assert torch.equal(capture.values[OUTPUT_WEIGHT], model.get_output_embeddings().weight)
    assert capture.values[OUTPUT_WEIGHT].data_ptr() != model.get_output_embeddings().weight.data_ptr()  # a copy
    torch.testing.assert_close(logits, everything.logits, rtol=1e-5, atol=1e-5)  # the forward itself is unchanged
    # and nothing stays hooked or wrapped afterwards
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert attn not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert not model.get_output_embeddings()._forward_pre_hooks or all(
        "keep" not in getattr(h, "__name__", "") for h in model.get_output_embeddings()._forward_pre_hooks.values())


def test_student_features_keep_their_gradients():
    model = tiny("gpt2").train()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    with FeatureCapture(model, {HIDDEN, EMBEDDINGS, attention(-1)}) as capture:
        model(input_ids=ids)
    total = capture.values[HIDDEN].sum() + capture.values[attention(-1)].sum() + capture.values[EMBEDDINGS].sum()
    total.backward()
    assert model.transformer.h[-1].attn.c_attn.weight.grad.abs().max() > 0
    assert model.transformer.wte.weight.grad.abs().max() > 0


def test_feature_names_and_dims():
    assert parse_feature("attention@-1") == ("attention", -1) and parse_feature(HIDDEN) == (HIDDEN, None)
    with pytest.raises(FeatureError, match="unknown feature 'hidden@x'"):
        parse_feature("hidden@x")
    with pytest.raises(FeatureError, match="2 decoder layers; layer 5 does not exist"):
        with FeatureCapture(tiny("llama"), {attention(5)}):
            pass
    assert model_dims(tiny("opt")) == (32, 32, 50, 2)
    model = tiny("llama")
    copy = gathered_output_weight(model)  # no ZeRO-3: a plain copy
    assert torch.equal(copy, model.lm_head.weight) and copy.data_ptr() != model.lm_head.weight.data_ptr()


class Probe(Method):
    """A method that keeps the features it is given (to test the pool's capture)."""

    name = "probe"
    terms = ("probe",)

    def __init__(self, features):
        super().__init__()
        self.wanted = frozenset(features)

    def teacher_features(self):
        return self.wanted

    def teacher(self, source: LogitSource, view, gold):
        rows = source.read(torch.arange(3))
        return TeacherOutput({**{k: v.clone() for k, v in source.features.items()}, "rows": rows}, None)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_the_pool_captures_the_same_features_on_both_teacher_paths(kind):
    model = tiny(kind)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, 8), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    batch = ModelBatch(ids, torch.ones_like(ids), labels)
    view = TeacherView(position_pairing(labels, labels), batch, batch)
    method = Probe({HIDDEN, EMBEDDINGS, attention(-1), OUTPUT_WEIGHT})
    config = TeacherConfig(name=kind)
    pool = TeacherPool([Teacher(kind, config, model, "", hidden_path=False),
                        Teacher(kind, config, model, "", hidden_path=True)], torch.device("cpu"))
    from mlot_ds.teachers.pool import bind_constants

    bind_constants(model, [method])
    with method.teacher_constants[OUTPUT_WEIGHT].gathered() as weight:  # no ZeRO-3: the weight itself
        assert torch.equal(weight, model.lm_head.weight) and not weight.requires_grad
        assert torch.is_grad_enabled()  # the method's student-side graph inside the block is kept
    full, hidden_path = (pool.run(t, view, method, gold=False).reduced for t in pool)
    assert set(full) == {HIDDEN, EMBEDDINGS, attention(-1), "rows"}  # the weight is a constant, not per forward
    for key in full:
        torch.testing.assert_close(hidden_path[key], full[key], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(full[HIDDEN], reference.hidden_states[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full["rows"], reference.logits.reshape(-1, 50)[:3], rtol=1e-5, atol=1e-5)


def test_a_linear_spec_learning_rate():
    assert LinearSpec(2, 3, lr=1e-3).learning_rate(5e-4) == 1e-3
    assert LinearSpec(2, 3, lr_scale=2.0).learning_rate(5e-4) == 1e-3
