"""The run, top to bottom: setup, train (with periodic evaluation), final evaluation, save, export, cleanup.

One optimizer step, on every rank (:meth:`Trainer.train_step`)::

    batches = this rank's grad_accum micro-batches of the step
    for each micro-batch, for each teacher in the recipe's order:   # every rank, never skipped
        teacher forward -> what its method keeps -> free the logits
    counts = the step's denominators, summed over ranks and micro-batches (one all-reduce)
    for each micro-batch:
        student forward
        loss = ce_weight * CE / tokens + sum_j w_j * sum_t a_jt * term_jt / counts_j
        backward  (a NaN gradient on every rank if any rank's loss is not finite: ZeRO-3 skips the update)
    optimizer step

A method may train small modules of its own (projectors, :mod:`mlot_ds.engine.modules`): they hang
under the student model, so the same engine, backward and optimizer step train them, and they are
called inside the method's student side. Features a method reads beside the logits (hidden states,
embeddings, ...) are captured by forward hooks during the same forwards (:mod:`mlot_ds.teachers.features`).
Without such methods neither adds anything.

Every term is a sum over this rank's micro-batch divided by its count over all ranks and
accumulation steps (docs/METHOD.md, "The normalisation contract"), then multiplied by ``world * grad_accum``
because DeepSpeed averages gradients over ranks and divides the loss by the accumulation steps.
The optimised loss is therefore the same whatever the world size or accumulation split.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import yaml

from mlot_ds import dist, losses
from mlot_ds.config import Recipe, RecipeError
from mlot_ds.engine import checkpoint
from mlot_ds.engine import modules as trainable
from mlot_ds.engine.ds_config import student_ds_config
from mlot_ds.engine.evaluation import evaluate_student
from mlot_ds.engine.metrics_log import MetricLog
from mlot_ds.engine.preflight import resume_folder
from mlot_ds.engine.setup import RunInputs, prepare_inputs
from mlot_ds.engine.signals import STOP_REQUEST
from mlot_ds.engine.weights import TeacherWeights
from mlot_ds.losses.method import TeacherView
from mlot_ds.teachers.cache import open_caches
from mlot_ds.teachers.features import FeatureCapture, check_captured
from mlot_ds.teachers.loading import load_causal_lm, resolve_dtype
from mlot_ds.teachers.pool import TeacherPool


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss; the run stops (exit status 1)."""


class StoppedBySignal(Exception):
    """SIGUSR1/SIGTERM arrived: a checkpoint was saved (or there was nothing to save yet)."""


@dataclass
class RunSummary:
    output_dir: Path
    export_dir: Path | None
    results: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Trainer:
    """One run of a recipe. :meth:`run` is the whole lifecycle; every method is collective."""

    def __init__(self, recipe: Recipe, ds_template: dict, ds_config_source: str):
        self.recipe = recipe
        self.ds_template = ds_template
        self.ds_config_source = ds_config_source
        self.paths = recipe.paths()
        self.global_step = 0
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.best_value: float | None = None
        self.log: MetricLog | None = None

    def run(self) -> RunSummary:
        started = time.time()
        self.setup()
        if dist.any_rank(STOP_REQUEST["signal"] is not None) and self.global_step == 0:
            self.cleanup()
            raise StoppedBySignal("stopped by signal during setup; nothing to save")
        try:
            self.train()
            self.save()
            results = self.evaluate() if self.inputs.eval_records else {}
            export_dir = self.export() if self.recipe.export.enabled else None
        finally:
            self.cleanup()
        return RunSummary(self.paths.output.resolve(), export_dir, results, time.time() - started)

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> None:

        recipe = self.recipe
        self.inputs: RunInputs = prepare_inputs(recipe)
        self.data = self.inputs.data
        self.world = dist.world_size()
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        self.total_steps = recipe.train.max_steps or recipe.train.epochs * self.data.steps_per_epoch
        self.ds_config = student_ds_config(self.ds_template, recipe, self.world, self.total_steps, self.device,
                                           source=self.ds_config_source)
        self.methods = self.inputs.methods
        self.module_manifest = trainable.module_manifest(self.methods)
        # Per teacher, the student features its method reads (captured during the student's forward).
        self.student_features = {name: wanted for name, m in self.methods.items() if (wanted := m.student_features())}
        # Every feature any method reads from the student, captured in its one forward (empty: no hooks).
        self.student_feature_names = frozenset().union(*self.student_features.values())
        inside_layers = sorted(f for f in self.student_feature_names if "@" in f)
        if inside_layers and recipe.student.gradient_checkpointing:
            # A checkpointed layer's forward is recomputed in the backward: what a hook keeps from inside
            # it would not carry the layer's gradient.
            raise RecipeError(f"student.gradient_checkpointing: the losses read {', '.join(inside_layers)} from inside "
                              f"the student's layers, which checkpointing recomputes; set it to false")
        if self.module_manifest:  # before any model is loaded: a scheduler that cannot scale per group is refused
            trainable.scale_schedule(self.ds_config, trainable.group_ratios(self.module_manifest, recipe.train.lr),
                                     source=self.ds_config_source)
        self.resume_from, self.load_from = self._resume_target()
        bf16 = bool(self.ds_config["bf16"]["enabled"])
        student_model = load_causal_lm(self.inputs.student.model, dtype=resolve_dtype(recipe.student.dtype, bf16),
                                       trust_remote_code=recipe.student.trust_remote_code,
                                       ds_config=self.ds_config, where="student.model")
        if recipe.student.gradient_checkpointing:
            student_model.gradient_checkpointing_enable()
        parameters = [p for p in student_model.parameters() if p.requires_grad]
        if self.module_manifest:
            parameters = self._add_modules(student_model)
        self.student, *_ = deepspeed.initialize(model=student_model, config=self.ds_config, model_parameters=parameters)
        if self.module_manifest:
            tree = getattr(self.student.module, trainable.MODULES_ATTR)
            for name, specs in self.module_manifest.items():
                self.methods[name].attach_modules({module: tree[name][module] for module in specs})
        self.teachers = TeacherPool.load(recipe.teachers, [str(t.model) for t in self.inputs.teachers],
                                         self.ds_config, recipe.train.micro_batch_size, self.device,
                                         caches=open_caches(recipe, self.inputs, self.methods), methods=self.methods)
        # The first teacher whose method can compute the student's CE in its own pass over the logits.
        self.fused_ce = next((t.name for t in recipe.teachers if self.methods[t.name].fuses_ce), None)
        self.weights = TeacherWeights([t.name for t in recipe.teachers], [t.weight for t in recipe.teachers],
                                      recipe.weighting.mode, recipe.weighting.normalize, recipe.weighting.temperature)
        self.recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        self._resume()
        self.log = MetricLog(self.paths.tensorboard, self.total_steps, self.global_step, self.recipe_yaml,
                             _flat_hparams(recipe))

    def _add_modules(self, student_model) -> list[dict]:
        """Build the methods' modules under the student model; its optimizer's parameter groups."""
        dtype = next(iter(student_model.parameters())).dtype
        tree = trainable.build_modules(self.module_manifest, seed=self.recipe.train.seed, dtype=dtype)
        trainable.attach(student_model, tree)
        groups, _ = trainable.parameter_groups(student_model, self.module_manifest, self.recipe.train.lr)
        dist.print0(f"trainable modules: {trainable.describe(self.module_manifest)}")
        return groups

    def _resume_target(self) -> tuple[Path | None, Path | None]:
        """The checkpoint to resume from, and the folder to load (its universal copy on a new world size).

        Checked before any engine exists: a universal checkpoint needs ``load_universal`` in the config.
        """
        folder = resume_folder(self.recipe)
        if folder is None:
            return None, None
        saved_world = checkpoint.saved_world_size(folder)
        reshard = saved_world not in (None, self.world) and self.recipe.train.reshard_on_resume
        checkpoint.check_compatible(folder, self.inputs.manifest, self.recipe.train.allow_teacher_change, self.world,
                                    self.data.steps_per_epoch, reshard=reshard, modules=self.module_manifest)
        if not reshard:
            return folder, folder
        dist.print0(f"{folder} was saved by {saved_world} ranks, this run has {self.world}: converting it to "
                    f"DeepSpeed's universal format")
        self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return folder, checkpoint.universal_copy(folder)

    def _resume(self) -> None:
        if self.resume_from is None:
            return
        state = checkpoint.load(self.student, self.load_from)
        self.global_step = int(state["global_step"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.best_value = state.get("best_value")
        self.weights.load_state_dict(state.get("weights", {}))
        dist.print0(f"resumed from {self.resume_from} at step {self.global_step}")

    # ------------------------------------------------------------------------------------- train
    def train(self) -> None:
        save_every, eval_every = self.recipe.train.save_every, self.recipe.eval.every
        while self.global_step < self.total_steps:
            started = time.perf_counter()
            metrics = self.train_step(self.global_step)
            self.global_step += 1
            metrics["train/tokens_per_s"] = metrics.pop("_tokens") / max(time.perf_counter() - started, 1e-9)
            if self.global_step % self.recipe.train.log_every == 0 or self.global_step == self.total_steps:
                self.log.scalars(self.global_step, metrics)
            self.log.progress(self.global_step, metrics["train/loss"], metrics["train/tokens_per_s"])
            if eval_every and self.global_step % eval_every == 0 and self.global_step < self.total_steps:
                self.keep_if_best(self.evaluate())
            if dist.any_rank(STOP_REQUEST["signal"] is not None):
                self.save()
                raise StoppedBySignal(f"stopped by signal at step {self.global_step}; checkpoint saved")
            if save_every and self.global_step % save_every == 0 and self.global_step < self.total_steps:
                self.save()

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; see the module docstring for its pseudo-code."""
        epoch, index = divmod(step, self.data.steps_per_epoch)
        batches = [batch.to(self.device) for batch in self.data.micro_batches(epoch, index)]
        weights = dict(self.weights.current)
        lr = float(self.student.get_lr()[0])  # the rate this step uses (the scheduler moves on in step())
        # Metric sums stay on the device (float32) until one transfer at the end of the step.
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        teacher_passes = [self.teacher_pass(batch, totals) for batch in batches]
        counts = self.global_counts(batches, teacher_passes)
        scale = self.world * self.recipe.train.grad_accum
        skipped = False
        for batch, passes in zip(batches, teacher_passes):
            loss, student_logits = self.student_loss(batch, passes, counts, weights, totals)
            if dist.any_rank(not bool(torch.isfinite(loss.detach()))):
                skipped = True
                loss = nan_gradient_loss(student_logits)
                if self.module_manifest:  # the modules' parameters get their NaN gradient too
                    loss = loss + trainable.nan_touch(getattr(self.student.module, trainable.MODULES_ATTR))
            # Every rank must hold the same metric keys (they are all-reduced as one vector).
            totals["train/loss"] += 0.0 if skipped else loss.detach().float()
            self.student.backward(loss * scale)
            self.student.step()  # DeepSpeed counts micro-steps; it updates only at the accumulation boundary
        if skipped:
            self._count_skip()
        return self._step_metrics(totals, counts, weights, skipped, lr)

    def teacher_pass(self, batch, totals) -> dict:
        """Every teacher's output for one micro-batch, in the recipe's order (collective)."""
        gold = self.recipe.weighting.mode == "dynamic"
        passes = {}
        for teacher in self.teachers:
            view = teacher_view(batch, teacher.name)
            output = self.teachers.run(teacher, view, self.methods[teacher.name], gold=gold, record_ids=batch.record_ids)
            if gold:
                totals[f"_ce_sum/{teacher.name}"] += output.gold["ce"].sum().detach().float()
                totals[f"_ce_tokens/{teacher.name}"] += float(output.gold["tokens"].sum())
            passes[teacher.name] = (view, output.reduced)
        return passes

    def global_counts(self, batches, teacher_passes) -> dict[str, float]:
        """The step's denominators over every rank and micro-batch: the student's labelled tokens and
        each teacher method's count (pairs, sequences, chunks...), in one all-reduce."""
        local: dict[str, float] = defaultdict(float)
        for batch, passes in zip(batches, teacher_passes):
            local["student_tokens"] += float(losses.ce.labelled_rows(batch.student.labels)[0].numel())
            for name, (view, reduced) in passes.items():
                for key, value in self.methods[name].counts(reduced, view).items():
                    local[f"{name}/{key}"] += value
        keys = sorted(local)
        summed = dist.all_reduce_sum(torch.tensor([local[k] for k in keys], dtype=torch.float64))
        return {key: float(value) for key, value in zip(keys, summed)}

    def student_loss(self, batch, passes, counts, weights, totals) -> tuple[torch.Tensor, torch.Tensor]:
        """``ce_weight * CE / tokens + sum_j w_j * KD_j`` for one micro-batch, and the student's logits."""
        student = batch.student
        with FeatureCapture(self.student, self.student_feature_names) as capture:
            logits = self.student(input_ids=student.input_ids, attention_mask=student.attention_mask,
                                  use_cache=False).logits
        features = check_captured(capture, "student") if self.student_feature_names else None
        ce_sum = None if self.fused_ce else losses.masked_ce(logits, student.labels)["ce"]
        loss = torch.zeros((), device=logits.device)
        for teacher in self.teachers:
            name, method = teacher.name, self.methods[teacher.name]
            view, reduced = passes[name]
            if name in self.student_features:
                view = view._replace(features={key: features[key] for key in self.student_features[name]})
            terms = method.student(logits, reduced, view, ce_labels=student.labels if name == self.fused_ce else None)
            if name == self.fused_ce:
                ce_sum = terms.pop("ce")
            # Terms are summed per denominator, then divided once: most methods have one count for all
            # their terms; a term may have its own (e.g. ALM's latents: unmerged chunks).
            groups: dict[str, list[str]] = defaultdict(list)
            for term in terms:
                groups[method.term_denominator(term)].append(term)
            divisors = {t: max(counts[f"{name}/{key}"], 1) for key, members in groups.items() for t in members}
            kd = sum(sum(method.term_weights[t] * terms[t] for t in members) / divisors[members[0]]
                     for members in groups.values())
            loss = loss + weights[name] * kd
            totals[f"teacher/{name}/kd"] += kd.detach().float()
            for term, value in terms.items():
                totals[f"teacher/{name}/{term}"] += value.detach().float() / divisors[term]
        ce = ce_sum / max(counts["student_tokens"], 1)
        totals["train/ce"] += ce.detach().float()
        return loss + self.recipe.train.ce_weight * ce, logits

    def _count_skip(self) -> None:
        """Count a skipped step; abort after ``train.max_consecutive_skips`` in a row."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.recipe.train.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss (last at step "
                f"{self.global_step + 1}); aborting. Lower train.lr, check the data, or raise "
                f"train.max_consecutive_skips."
            )

    def _step_metrics(self, totals, counts, weights, skipped, lr) -> dict[str, float]:
        keys = sorted(totals)
        reduced = dist.all_reduce_sum(torch.stack([totals[k].reshape(()) for k in keys]))
        values = {k: float(v) for k, v in zip(keys, reduced)}
        if self.recipe.weighting.mode == "dynamic":
            names = [t.name for t in self.teachers]
            self.weights.update({n: values[f"_ce_sum/{n}"] for n in names}, {n: values[f"_ce_tokens/{n}"] for n in names})
        if not skipped:
            self.consecutive_skips = 0
        metrics = {k: v for k, v in values.items() if not k.startswith("_")}
        metrics["train/lr"] = lr
        grad_norm = self.student.get_global_grad_norm()
        finite = grad_norm is not None and not skipped and torch.isfinite(torch.as_tensor(grad_norm))
        metrics["train/grad_norm"] = float(grad_norm) if finite else 0.0
        metrics["train/skipped_steps"] = float(self.skipped_steps)
        for name, weight in weights.items():
            metrics[f"teacher/{name}/weight"] = weight
        metrics["_tokens"] = counts["student_tokens"]
        return metrics

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, float]:
        """Collective: evaluate the live student on ``data.eval``, log and return ``eval/*``."""
        results = evaluate_student(self.student.module, self.inputs.student_tokenizer, self.inputs.eval_records,
                                   self.recipe, self.global_step, self.device, self.log)
        if results:
            self.log.scalars(self.global_step, results)
        return results

    def keep_if_best(self, results: dict[str, float]) -> None:
        """Collective: save and mark a checkpoint when ``eval.best_metric`` improved."""
        metric = self.recipe.eval.best_metric
        if metric is None or metric not in results:
            return
        value = results[metric]
        sign = -1.0 if metric == "eval/bits_per_byte" else 1.0
        if self.best_value is not None and sign * value <= sign * self.best_value:
            return
        self.best_value = value
        folder = self.save()
        dist.rank0_then_barrier(lambda: checkpoint.mark_best(self.paths.checkpoints, folder, metric, value))
        self.log.message(f"best {metric} = {value:.4f} at step {self.global_step}: {folder}")

    # ------------------------------------------------------------------------- save / export / cleanup
    def save(self) -> Path:
        current = self.paths.checkpoints / checkpoint.tag_for(self.global_step)
        if checkpoint.find_latest(self.paths.checkpoints) == current:
            return current  # already saved at this step (e.g. as the best one)
        state = {"global_step": self.global_step, "consecutive_skips": self.consecutive_skips, "best_value": self.best_value,
                 "skipped_steps": self.skipped_steps, "weights": self.weights.state_dict(),
                 "steps_per_epoch": self.data.steps_per_epoch, "world_size": self.world,
                 "global_batch": self.recipe.train.micro_batch_size * self.recipe.train.grad_accum * self.world}
        folder = checkpoint.save(self.student, self.paths.checkpoints, self.global_step, state, self.recipe_yaml,
                                 self.inputs.manifest, self.recipe.train.keep_last, modules=self.module_manifest)
        self.log.message(f"checkpoint: {folder}")
        return folder

    def export(self) -> Path:
        return checkpoint.export_hf(self.student, self.inputs.student_tokenizer, self.paths.export,
                                    modules=self.module_manifest)

    def cleanup(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def teacher_view(batch, name: str) -> TeacherView:
    """What one teacher's method sees of a micro-batch."""
    return TeacherView(batch.pairings[name], batch.student, batch.teachers[name],
                       batch.groups.get(name), batch.overlaps.get(name))


def nan_gradient_loss(student_logits: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is NaN everywhere, walking the whole graph.

    Every rank runs the same backward collectives, and ZeRO-3's own check of the global gradient
    norm (all-reduced, so every rank sees it) then skips the optimizer update on every rank:
    parameters, optimizer moments and the lr schedule stay as they were, with or without a
    scheduler in the DeepSpeed JSON.
    """
    return student_logits.sum() * float("nan")


def _flat_hparams(recipe: Recipe) -> dict:
    hparams = {"lr": recipe.train.lr, "micro_batch_size": recipe.train.micro_batch_size,
               "grad_accum": recipe.train.grad_accum, "world_size": dist.world_size(),
               "weighting": recipe.weighting.mode, "student": recipe.student.model}
    for teacher in recipe.teachers:
        hparams[f"{teacher.name}/weight"] = teacher.weight
        hparams[f"{teacher.name}/loss"] = teacher.loss.kind
        hparams[f"{teacher.name}/pairing"] = teacher.pairing
    return hparams
