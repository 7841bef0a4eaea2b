"""The planner, piece by piece, against independent references: the real models' parameter counts
(built on the meta device), the bytes autograd really saves, hand-replayed ZeRO-3 gathers, DeepSpeed's
own model-states estimator, hand-computed plans and FLOPs; and its command line and dry-run lines.
The planned-vs-measured check on real jobs is tests/test_plan_validation.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch

from mlot_ds.config import load_recipe
from mlot_ds.losses.registry import METHODS
from mlot_ds.plan import Cluster, dry_run_lines, plan_recipe
from mlot_ds.plan import activations
from mlot_ds.plan.activations import Tokens
from mlot_ds.plan.memory import CPU, CUDA, Job, StudentSpec, TeacherSpec, partition, plan_memory
from mlot_ds.plan.model_shapes import Module, ModelShape, Param, PlanError, model_shape, shape_from_config
from mlot_ds.plan.throughput import Assumptions, estimate
from mlot_ds.plan.zero3 import ZeroSettings, gathered_peak, training_trace, zero_settings
from tests.helpers import REPO

PLANNING = REPO / "docs" / "planning"
EXAMPLES = ("llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "mistral-7b-v0.3")


def small_configs(layers: int = 2):
    from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    llama = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                 num_hidden_layers=layers)
    return {
        "llama": LlamaConfig(**llama),
        "llama-tied-biases": LlamaConfig(**llama, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        "qwen2": Qwen2Config(**llama),
        "qwen3": Qwen3Config(**llama, head_dim=24),
        "mistral": MistralConfig(**llama),
        "phi3": Phi3Config(**llama, pad_token_id=0),
        "gpt2": GPT2Config(n_embd=64, n_inner=176, n_head=4, vocab_size=500, n_layer=layers, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0),
        "opt": OPTConfig(hidden_size=64, ffn_dim=176, num_attention_heads=4, vocab_size=500, word_embed_proj_dim=64,
                         num_hidden_layers=layers, dropout=0.0, attention_dropout=0.0),
        "opt-projected": OPTConfig(hidden_size=64, ffn_dim=176, num_attention_heads=4, vocab_size=500,
                                   word_embed_proj_dim=32, num_hidden_layers=layers),
        "gpt_neox": GPTNeoXConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, vocab_size=500,
                                  num_hidden_layers=layers, hidden_dropout=0.0, attention_dropout=0.0),
    }


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------------ parameters


@pytest.mark.parametrize("name", list(small_configs()))
def test_parameters_module_by_module_equal_the_real_model(name):
    config = small_configs()[name]
    model = meta_model(config)
    shape = shape_from_config(config, name)
    real = sum({id(p): p.numel() for p in model.parameters()}.values())
    own = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()}
    assert shape.params == real
    assert {m.name: m.numel for m in shape.modules} == {n: k for n, k in own.items() if k}
    assert shape.largest_module == max(own.values())


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_worked_examples_configs_have_the_public_parameter_counts(name):
    from transformers import AutoConfig

    shape = model_shape(PLANNING / name, name)
    real = sum({id(p): p.numel() for p in meta_model(AutoConfig.from_pretrained(PLANNING / name)).parameters()}.values())
    assert shape.params == real
    published = {"llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.55e9, "qwen2.5-7b": 7.62e9,
                 "mistral-7b-v0.3": 7.25e9}[name]
    assert abs(shape.params - published) / published < 0.005


def test_a_folder_without_config_json_or_an_unknown_architecture_is_one_clear_error(tmp_path):
    with pytest.raises(PlanError, match="teachers\\[0\\].model: .* has no config.json"):
        model_shape(tmp_path, "teachers[0].model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(PlanError, match="model type 'bert' .* is not one the planner knows"):
        model_shape(tmp_path, "student.model")


# ----------------------------------------------------------------------------------- activations


def saved_bytes(config, tokens: Tokens, dtype, checkpointing=False) -> int:
    """What autograd keeps for the backward (parameters excepted, each storage once)."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 100, (tokens.batch, tokens.seq_len))
    mask = torch.ones_like(ids)
    if tokens.padded:
        mask[0, :3] = 0
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_saved_activations_per_layer_equal_what_autograd_keeps(name, dtype, padded):
    config = small_configs()[name]
    tokens = Tokens(2, 40, padded)
    b = 4 if dtype == torch.float32 else 2
    measured = saved_bytes(config, tokens, dtype)
    one_layer = saved_bytes(small_configs(layers=1)[name], tokens, dtype)
    shape = shape_from_config(config, name)
    per_layer = activations.saved_per_layer(shape, tokens, b)
    tolerance = 0.05 if name == "phi3" and padded else 0.01  # Phi-3's fused projections under a mask: within 5%
    assert abs(per_layer - (measured - one_layer)) <= tolerance * (measured - one_layer)
    outside = activations.saved_outside_layers(shape, tokens, b)
    assert abs(outside - (one_layer - per_layer)) <= 0.1 * (one_layer - per_layer) + 4 * tokens.count * shape.heads


def test_gradient_checkpointing_keeps_only_each_layers_input():
    config = small_configs()["llama"]
    tokens = Tokens(2, 40, True)
    measured = saved_bytes(config, tokens, torch.bfloat16, checkpointing=True)
    shape = shape_from_config(config, "llama")
    kept = shape.layers * 2 * tokens.count * shape.hidden + activations.saved_outside_layers(shape, tokens, 2)
    assert abs(kept - measured) <= 0.05 * measured
    # The planned figure adds the one layer rebuilt during the backward.
    assert activations.training_activations(shape, tokens, 2, True) == kept + activations.saved_per_layer(shape, tokens, 2)


# ----------------------------------------------------------------------------------------- ZeRO-3


def toy(*numels, tied=False) -> ModelShape:
    modules = tuple(Module(f"m{i}", (Param(f"m{i}.w", n),), layer=i) for i, n in enumerate(numels))
    if tied:
        modules += (Module("head", modules[0].params),)
    return ModelShape("toy", "llama", "llama", 8, len(numels), 1, 1, 8, 8, 10, tied, None, modules)


def test_prefetch_gathers_the_next_parameters_up_to_the_bucket():
    shape = toy(10, 20, 30)
    settings = ZeroSettings(prefetch_bucket_size=15, param_persistence_threshold=1, max_reuse_distance=0)
    # At m0: m0 fetched, m1 prefetched (20 >= 15): 30. At m1: m1 + prefetched m2: 50. At m2: 30.
    assert gathered_peak(shape, list(shape.modules), settings, world=2).gathered == 50
    settings = dataclasses.replace(settings, prefetch_bucket_size=0)
    assert gathered_peak(shape, list(shape.modules), settings, world=2).gathered == 30  # one module at a time


def test_reuse_distance_keeps_a_layer_from_its_forward_to_its_backward():
    shape = toy(10, 20, 30)
    trace = training_trace(shape, checkpointing=False)  # m0 m1 m2 m2 m1 m0
    keep_all = ZeroSettings(prefetch_bucket_size=0, param_persistence_threshold=1, max_reuse_distance=10**9)
    assert gathered_peak(shape, trace, keep_all, world=2).gathered == 60
    # Distance 65: m0's next use is 20 + 30 + 30 + 20 = 100 elements away (released), m1's 30 + 30 = 60
    # (kept), m2's 0 (kept until its backward): m1 + m2 = 50 at the turn.
    near = dataclasses.replace(keep_all, max_reuse_distance=65)
    assert gathered_peak(shape, trace, near, world=2).gathered == 50
    # Distance 55: m1 is released after its forward as well; at most one module is whole: m2, 30.
    assert gathered_peak(shape, trace, dataclasses.replace(keep_all, max_reuse_distance=55), world=2).gathered == 30
    assert gathered_peak(shape, trace, near, world=1).gathered == 0  # one partition is the whole parameter


def test_persistent_parameters_are_not_gathered_and_a_tied_head_is_fetched_again():
    shape = toy(100, 5, 50, tied=True)  # m1 is below the threshold
    settings = ZeroSettings(prefetch_bucket_size=0, param_persistence_threshold=10, max_reuse_distance=60)
    peak = gathered_peak(shape, list(shape.modules), settings, world=2)
    assert peak.persistent == 5
    # The embedding (100) is reused by the head after 5 + 50 elements < 60: kept, so 100 + 50 at m2.
    assert peak.gathered == 150


def test_checkpointing_reruns_each_layer_right_before_its_backward():
    shape = toy(1, 2, 3)
    names = [m.name for m in training_trace(shape, checkpointing=True)]
    assert names == ["m0", "m1", "m2", "m2", "m2", "m1", "m1", "m0", "m0"]


def test_deepspeed_json_defaults_and_bad_values():
    settings = zero_settings(json.loads((REPO / "ds_configs" / "zero3.json").read_text()))
    assert (settings.reduce_bucket_size, settings.prefetch_bucket_size, settings.param_persistence_threshold) == (
        5 * 10**7, 5 * 10**7, 10**4)
    assert settings.max_reuse_distance == settings.max_live_parameters == 10**9 and settings.offload_optimizer is None
    offload = zero_settings(json.loads((REPO / "ds_configs" / "zero3_offload_all.json").read_text()))
    assert offload.offload_optimizer == offload.offload_param == "cpu" and offload.pin_memory
    with pytest.raises(PlanError, match="zero_optimization.stage must be 3"):
        zero_settings({"zero_optimization": {"stage": 2}}, "x.json")
    with pytest.raises(PlanError, match="x.json: zero_optimization.reduce_bucket_size must be a non-negative number"):
        zero_settings({"zero_optimization": {"stage": 3, "reduce_bucket_size": "big"}}, "x.json")


# ------------------------------------------------------------------ model states vs DeepSpeed's estimator


def job_for(shape: ModelShape, world: int, *, b=2, zero=ZeroSettings(), teachers=(), micro_batch=2, seq_len=64,
            pairs=32, checkpointing=False) -> Job:
    return Job(StudentSpec(shape, b, checkpointing), tuple(teachers), micro_batch, 1, seq_len, pairs, True, zero, world)


@pytest.mark.parametrize("offload", ["none", "optimizer", "all"])
def test_student_model_states_agree_with_deepspeeds_estimator(offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params

    from transformers import AutoModelForCausalLM

    # DeepSpeed's own count (``model_to_params``, as the "all live" estimator reads a model) of a real
    # small model equals the planner's; the 1B student's counts go to the "cold" estimator.
    config = small_configs()["llama-tied-biases"]
    torch.manual_seed(0)
    assert model_to_params(AutoModelForCausalLM.from_config(config)) == (
        shape_from_config(config, "x").params, shape_from_config(config, "x").largest_module)
    shape = model_shape(PLANNING / "llama-3.2-1b", "student")
    total, largest = shape.params, shape.largest_module
    nodes, per_node = 2, 8
    world = nodes * per_node
    zero = ZeroSettings(offload_optimizer=None if offload == "none" else "cpu", offload_param="cpu" if offload == "all" else None)
    cpu_mem, gpu_mem, largest_memory = estimate_zero3_model_states_mem_needs(
        total, largest, per_node, nodes, cpu_offload=offload != "none", cpu_offload_params=offload == "all",
        zero_init=True, additional_buffer_factor=1.0)
    memory = plan_memory(job_for(shape, world, zero=zero), CUDA)
    device = {i.label: i.bytes for i in memory.always if i.where == "device" and i.label.startswith("student")}
    host = {i.label: i.bytes for i in memory.always if i.where == "host"}
    step = {i.label.split(":")[0]: i.bytes for i in memory.phases["step"]}
    part = partition(shape, world)
    assert abs(part - total / world) < len(shape.modules)  # partitions are padded per parameter only
    # DeepSpeed counts 2 (bf16 parameters) + 4 (float32 gradients) + 12 (fp32 master and Adam) bytes per
    # element of the partition; the planner has the same, with the bf16 gradient partition ZeRO-3 keeps
    # between steps (2), the gradient bucket and the optimizer step's float32 copy as their own items.
    states = gpu_mem - largest_memory
    if offload == "none":
        planned = (device["student parameters (ZeRO-3 partition)"] + device["student fp32 master weights (partition)"]
                   + device["student optimizer states (adamw, partition)"] + 4 * part)
        assert abs(planned - states) <= 18 * len(shape.modules)
        # 4 (float32 gradients) + 2 (the flattened bf16 copy being converted) per element, more than the
        # float64 norm copy of the largest parameter's partition (8 x 262.7M / 16).
        assert step["optimizer step"] == 6 * part > 8 * shape.largest_module / world
    elif offload == "optimizer":
        assert abs(device["student parameters (ZeRO-3 partition)"] - states) <= 2 * len(shape.modules)
        # Host: DeepSpeed's 16 (fp32 master, Adam, fp32 gradients) per element and node; the planner adds
        # the bf16 gradient partition (2).
        without_bf16_grads = sum(host.values()) - host["student gradients (partition)"]
        assert abs(without_bf16_grads * per_node - cpu_mem) <= 16 * per_node * len(shape.modules)
    else:
        assert states == 0 and "student parameters (ZeRO-3 partition)" not in device
    assert largest_memory == 4 * shape.largest_module  # DeepSpeed: one float32 layer; the planner: gathers replayed


# ------------------------------------------------------------------------------ a hand-computed plan


def test_a_hand_computed_plan():
    shape = toy(100, 200, 300)
    teacher_shape = toy(400, 500)
    kl = METHODS["kl"]
    teacher = TeacherSpec("t", teacher_shape, 2, "replicate", "live", True, "kl", kl.Params(top_k=4), kl, seq_len=8)
    zero = ZeroSettings(reduce_bucket_size=1000, prefetch_bucket_size=0, param_persistence_threshold=1)
    job = job_for(shape, 2, zero=zero, teachers=[teacher], micro_batch=2, seq_len=8, pairs=4)
    memory = plan_memory(job, CUDA)
    always = {i.label: i.bytes for i in memory.always}
    part = 50 + 100 + 150
    assert always["student parameters (ZeRO-3 partition)"] == 2 * part
    assert always["student gradients (partition)"] == 2 * part
    assert always["student fp32 master weights (partition)"] == 4 * part
    assert always["student optimizer states (adamw, partition)"] == 8 * part
    assert always["student gradient bucket (reduce_bucket_size)"] == 2 * 1000
    assert always["teacher t parameters (full copy)"] == 2 * 900
    student = {i.label: i.bytes for i in memory.phases["student"]}
    assert student["student logits [B, T, V]"] == 2 * 8 * 10 * 2
    assert student["student logits gradients (1 x [B, T, V] while autograd sums 1)"] == 2 * 8 * 10 * 2  # kl fuses CE
    kept = 2 * 4 * (4 * (8 + 4) + 4)  # ids int64 + log-probabilities float32 per top-k slot, one tail per row
    assert student["teacher outputs kept for the student (x 1 micro-batches)"] == kept
    assert memory.phase_total("student") == memory.device_always() + sum(student.values())
    assert memory.peak == max(memory.phase_total(p) for p in memory.phases)
    assert memory.dominant.bytes == max(i.bytes for i in memory.peak_items())


def test_placements_move_a_teacher_between_device_host_and_nothing():
    shape = model_shape(PLANNING / "llama-3.2-1b", "student")
    teacher_shape = model_shape(PLANNING / "llama-3.1-8b", "t")
    mlot = METHODS["mlot"]
    totals = {}
    for placement, source in (("shard", "live"), ("offload", "live"), ("replicate", "live"), ("shard", "cache")):
        teacher = TeacherSpec("t", teacher_shape, 2, placement, source, True, "mlot", mlot.Params(), mlot, seq_len=512)
        memory = plan_memory(job_for(shape, 8, teachers=[teacher], seq_len=512, pairs=256), CUDA)
        totals[(placement, source)] = (memory.device_always(), memory.host, list(memory.phases))
    part = partition(teacher_shape, 8)
    whole = teacher_shape.persistent_params(ZeroSettings().param_persistence_threshold)  # kept whole when sharded
    shard, offload, replicate, cached = (totals[k] for k in totals)
    assert replicate[0] - shard[0] == 2 * (teacher_shape.params - part - whole)
    assert shard[0] - offload[0] == pytest.approx(2 * part, abs=2 * 10**5) and offload[1] - shard[1] == 2 * part
    assert "teacher:t" not in cached[2] and cached[0] < offload[0]


# ------------------------------------------------------------------------------------- throughput


def test_flops_are_six_n_per_student_token_and_two_n_per_teacher_token():
    shape = model_shape(PLANNING / "llama-3.2-1b", "s")
    teacher_shape = model_shape(PLANNING / "llama-3.1-8b", "t")
    mlot = METHODS["mlot"]
    teacher = TeacherSpec("t", teacher_shape, 2, "shard", "live", False, "mlot", mlot.Params(), mlot, seq_len=1024)
    job = job_for(shape, 8, teachers=[teacher], micro_batch=4, seq_len=1024, pairs=512)
    result = estimate(job, nodes=1, assumptions=Assumptions(gpu_tflops=100.0, mfu=0.5))
    n = 4 * 1024
    attention = 2 * shape.layers * 1024 * shape.heads * shape.head_dim
    assert result.flops["student"] == pytest.approx(n * 3 * (2 * shape.matmul_params + attention))
    t_attention = 2 * teacher_shape.layers * 1024 * teacher_shape.heads * teacher_shape.head_dim
    assert result.flops["teacher t"] == pytest.approx(n * (2 * teacher_shape.matmul_params + t_attention))
    assert result.compute_s == pytest.approx(sum(result.flops.values()) / 50e12)
    moved = (3 * shape.params * 2 + teacher_shape.params * 2) * 7 / 8
    assert result.communication_s == pytest.approx(moved / 150e9)
    assert result.step_s == pytest.approx(max(result.compute_s, result.communication_s))
    # A tied head is multiplied once; its embedding is looked up, not multiplied.
    assert shape.matmul_params == shape.params and teacher_shape.matmul_params == teacher_shape.params - 128256 * 4096


# --------------------------------------------------------------------------------- recipes and CLI


def example(name: str, *overrides: str):
    return load_recipe(PLANNING / f"{name}.yaml", list(overrides))


def ds_template():
    return json.loads((REPO / "ds_configs" / "zero3.json").read_text())


def test_the_worked_examples_say_what_docs_planning_says():
    from mlot_ds.plan.report import advice, throughput_line, verdict

    first = plan_recipe(example("1b-3x8b"), ds_template(), Cluster(2, 8, 80 * 2**30))
    assert first.fits and first.memory.peak_phase == "student" and first.memory.dominant.label == "student activations"
    assert first.faster is not None and first.faster.override == "teachers.llama.placement=replicate"
    longer = plan_recipe(example("1b-3x8b", "data.max_length=4096", "train.micro_batch_size=8"), ds_template(),
                         Cluster(2, 8, 80 * 2**30))
    assert not longer.fits and longer.fix is not None and longer.fix.fits
    big = plan_recipe(example("8b-70b"), ds_template(), Cluster(4, 8, 80 * 2**30))
    assert big.fits and big.headroom < 4 * 2**30 and big.memory.dominant.label == "student activations"
    fewer = plan_recipe(example("8b-70b"), ds_template(), Cluster(2, 8, 80 * 2**30))
    assert not fewer.fits and fewer.fix is not None and fewer.fix.override == "teachers.llama70b.source=cache"
    checkpointed = plan_recipe(example("8b-70b", "student.gradient_checkpointing=true"), ds_template(),
                               Cluster(4, 8, 80 * 2**30))
    # The lines docs/PLANNING.md quotes are the planner's, word for word, and it quotes no other.
    doc = (REPO / "docs" / "PLANNING.md").read_text()
    worked = doc[doc.index("## Worked examples"):]
    printed = {verdict(p) for p in (first, longer, big, fewer)} | {advice(p) for p in (first, longer, fewer)} | {
        throughput_line(p) for p in (first, big)}
    quoted = {line for line in worked.splitlines() if line.startswith(("per-rank peak", "cheapest change", "faster and",
                                                                        "throughput ~"))}
    assert quoted == printed, (quoted - printed, printed - quoted)
    assert f"{checkpointed.memory.peak / 2**30:.2f} GiB peak and a step of\n~{checkpointed.estimate.step_s:.2f} s" in worked
    assert f"{first.faster.peak / 2**30:.2f}" in worked and f"{longer.fix.peak / 2**30:.2f}" in worked
    replicated = plan_recipe(example("1b-3x8b", "teachers.llama.placement=replicate"), ds_template(), Cluster(2, 8, 80 * 2**30))
    assert replicated.faster is not None and replicated.faster.override == "teachers.qwen.placement=replicate"
    assert f"fits ({replicated.faster.peak / 2**30:.2f} GiB) and would be ~{replicated.faster.step_s:.2f} s" in worked


def test_the_command_line_prints_a_table_or_json_and_bad_input_is_one_line(tmp_path):
    base = [sys.executable, "-m", "mlot_ds.plan", "--recipe", str(PLANNING / "8b-70b.yaml"), "--nodes", "4",
            "--gpus-per-node", "8", "--gpu-memory", "80GB"]
    done = subprocess.run(base + ["--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["fits"] is True and plan["per_rank"]["peak_phase"] == "student"
    assert set(plan["per_rank"]["phase_totals"]) == {"teacher:llama70b", "student", "step"}
    text = subprocess.run(base, capture_output=True, text=True, cwd=REPO, timeout=300).stdout
    assert "per-rank peak" in text and "TFLOP/s peak per GPU" in text and "dominant:" in text
    bad = subprocess.run(base + ["--gpu-memory", "lots"], capture_output=True, text=True, cwd=REPO, timeout=300)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and errors == ["error: --gpu-memory: expected a size such as 80GB, 1TB or 512MB; got 'lots'"]
    missing = subprocess.run(base + [f"teachers.0.model={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert missing.returncode == 2 and f"teachers[0].model: {tmp_path} has no config.json" in missing.stderr


@pytest.mark.parametrize(("arguments", "message"), [
    (["--nodes", "x"], "error: argument --nodes: invalid int value: 'x'"),
    (["--nodes", "0"], "error: --nodes: expected a positive integer; got 0"),
    (["--seq-len", "-5"], "error: --seq-len: expected a positive integer; got -5"),
    (["--pairs", "0"], "error: --pairs: expected a positive integer; got 0"),
    (["--mfu", "nan"], "error: --mfu: expected a share in (0, 1]; got nan"),
    (["--gpu-tflops", "inf"], "error: --gpu-tflops: expected a positive finite number; got inf"),
    (["--gpu-memory", "0GB"], "error: --gpu-memory: expected a size above zero; got '0GB'"),
    (["--reserve", "1"], "error: --reserve: expected a share in [0, 1); got 1.0"),
    (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
    (["train.micro_batch_size=0"], "error: train.micro_batch_size"),
])
def test_every_bad_argument_is_one_line_and_exit_2(arguments, message, capsys):
    from mlot_ds.plan.__main__ import main

    try:
        code = main(["--recipe", str(PLANNING / "1b-3x8b.yaml"), *arguments])
    except SystemExit as exc:  # argparse's own errors leave through exit()
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "real_accelerator" not in line]
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err


def test_dry_run_lines_are_short_and_never_raise(tmp_path):
    recipe = example("1b-3x8b")
    folders = {"student": PLANNING / "llama-3.2-1b", "llama": PLANNING / "llama-3.1-8b", "qwen": PLANNING / "qwen2.5-7b",
               "mistral": PLANNING / "mistral-7b-v0.3"}
    lines = dry_run_lines(recipe, ds_template(), 2, folders, "zero3.json")
    assert 3 <= len(lines) <= 8 and any("per-rank peak" in line for line in lines)
    assert all(line.startswith("plan: ") and not line.startswith("plan: plan:") for line in lines)
    not_built = dry_run_lines(recipe, ds_template(), 2, {**folders, "qwen": tmp_path / "zoo" / "teacher-qwen"}, "zero3.json")
    assert len(not_built) == 1 and "no config.json yet" in not_built[0]
    broken = dry_run_lines(recipe, {"zero_optimization": {"stage": 1}}, 2, folders, "x.json")
    assert len(broken) == 1 and broken[0].startswith("plan: not made (PlanError: x.json: zero_optimization.stage")


def test_a_cpu_plan_uses_float32_and_the_cpu_mechanisms():
    recipe = example("1b-3x8b")
    plan = plan_recipe(recipe, ds_template(), Cluster(1, 2, 2**40, device="cpu", reserve=0.0))
    assert plan.job.student.dtype_bytes == 4 and all(t.dtype_bytes == 4 for t in plan.job.teachers)
    labels = [i.label for i in plan.memory.phases["teacher:llama"]]
    assert any("all-gather's own copy" in label for label in labels)
    assert CPU.gather_copy and not CUDA.gather_copy
    # The step time is a GPU cluster's estimate: CPU ranks get none (the dry run on this machine).
    from mlot_ds.plan.report import short, table

    assert "throughput: not estimated for CPU ranks" in short(plan)[-1] and "TFLOP/s" not in table(plan)


@pytest.mark.shared
def test_the_dry_run_prints_the_short_plan_for_real_model_folders(tmp_path, shared_dir, capsys):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from mlot_ds.engine.cli import main as cli_main

    folder = tmp_path / "gpt2-tiny"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50257)).save_pretrained(folder)
    for file in (shared_dir / "tokenizers" / "gpt2").iterdir():
        if file.name != "SOURCE.md":
            shutil.copy(file, folder / file.name)
    recipe = {"name": "plan-dry-run", "student": {"model": str(folder)},
              "teachers": [{"name": "same", "model": str(folder), "pairing": "position", "loss": {"kind": "kl"}}],
              "data": {"train": {"adapter": "dialogsum", "path": "builtin:dialogsum/train", "limit": 8}, "eval": None},
              "train": {"output_dir": str(tmp_path / "run")}, "export": {"enabled": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    code = cli_main(["--config", str(REPO / "ds_configs" / "zero3.json"), "--recipe", str(path), "--dry-run"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("plan: ")]
    assert code == 0 and out.splitlines()[0].startswith("dry run OK")
    assert 3 <= len(lines) <= 8 and any("per-rank peak" in line and "fits" in line for line in lines), out
