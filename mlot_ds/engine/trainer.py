"""The training loop: setup, train, save, cleanup. Explicit and linear.

One optimizer step, on every rank::

    for each of grad_accum micro-batches:
        for each teacher, in the recipe's order:        # every rank, every step, never skipped
            teacher forward -> keep what its loss needs -> free the logits
        student forward -> CE + sum_j w_j * KD_j, every term divided by its GLOBAL denominator
        backward
    optimizer step

Every term is a sum over this rank's micro-batch divided by the count over all ranks and
accumulation steps (METHOD.md), then multiplied by ``world * grad_accum`` because DeepSpeed
averages gradients over ranks and divides the loss by the accumulation steps. The optimised loss
is therefore the same whatever the world size or accumulation split.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from mlot_ds import dist, losses
from mlot_ds.config import Recipe
from mlot_ds.engine import checkpoint
from mlot_ds.engine.ds_config import student_ds_config
from mlot_ds.engine.metrics_log import MetricLog
from mlot_ds.engine.signals import REQUEUE_EXIT_CODE, STOP_REQUEST
from mlot_ds.engine.teacher_loss import TeacherLoss
from mlot_ds.engine.weights import TeacherWeights
from mlot_ds.teachers.cache import open_caches
from mlot_ds.teachers.loading import load_causal_lm, resolve_dtype
from mlot_ds.teachers.pool import TeacherPool


class NonFiniteLossError(RuntimeError):
    pass


def quiet_deepspeed_deprecations() -> None:
    """Hide the two FutureWarnings DeepSpeed's ZeRO-3 triggers on every step by calling torch APIs that
    torch has deprecated; exactly those messages, nothing else."""
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated", category=FutureWarning)


class Trainer:
    def __init__(self, recipe: Recipe, ds_template: dict, ds_config_source: str, setup_state):
        """``setup_state`` is a :class:`mlot_ds.engine.setup.RunInputs` (data, tokenizers, paths)."""
        self.recipe = recipe
        self.ds_template = ds_template
        self.ds_config_source = ds_config_source
        self.inputs = setup_state
        self.output_dir = Path(recipe.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.global_step = 0
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.best_value: float | None = None

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed

        recipe, inputs = self.recipe, self.inputs
        self.world = dist.world_size()
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        self.data = inputs.data
        self.total_steps = recipe.train.max_steps or recipe.train.epochs * self.data.steps_per_epoch
        self.ds_config = student_ds_config(self.ds_template, recipe, self.world, self.total_steps, self.device,
                                           source=self.ds_config_source)
        # The checkpoint to resume from is checked before any engine exists: a universal checkpoint
        # (another number of ranks) needs load_universal in the engine's config.
        self.resume_folder = self._resume_folder()
        self.load_folder = self.resume_folder
        if self.resume_folder is not None:
            saved_world = checkpoint.saved_world_size(self.resume_folder)
            reshard = saved_world not in (None, self.world) and recipe.train.reshard_on_resume
            checkpoint.check_compatible(self.resume_folder, inputs.manifest, recipe.train.allow_teacher_change,
                                        self.world, self.data.steps_per_epoch, reshard=reshard)
            if reshard:
                dist.print0(f"{self.resume_folder} was saved by {saved_world} ranks, this run has {self.world}: "
                            f"converting it to DeepSpeed's universal format")
                self.load_folder = checkpoint.universal_copy(self.resume_folder)
                self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        bf16 = bool(self.ds_config["bf16"]["enabled"])

        student_model = load_causal_lm(inputs.student.model, dtype=resolve_dtype(recipe.student.dtype, bf16),
                                       trust_remote_code=recipe.student.trust_remote_code,
                                       ds_config=self.ds_config, where="student.model")
        if recipe.student.gradient_checkpointing:
            student_model.gradient_checkpointing_enable()
        self.student, *_ = deepspeed.initialize(model=student_model, config=self.ds_config,
                                                model_parameters=[p for p in student_model.parameters()
                                                                  if p.requires_grad])
        self.teacher_losses = {
            t.name: TeacherLoss(t.loss, self.data.vocab_maps.get(t.name) if t.loss.kind == "mined" else None)
            for t in recipe.teachers
        }
        self.teachers = TeacherPool.load(recipe.teachers, [str(t.model) for t in inputs.teachers],
                                         self.ds_config, recipe.train.micro_batch_size, self.device,
                                         caches=open_caches(recipe, inputs, self.teacher_losses))
        self.weights = TeacherWeights([t.name for t in recipe.teachers], [t.weight for t in recipe.teachers],
                                      recipe.weighting.mode, recipe.weighting.normalize,
                                      recipe.weighting.temperature)
        self.recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        self.manifest = inputs.manifest
        self._resume()
        self.log = MetricLog(self.output_dir / "tensorboard", self.total_steps, self.global_step, self.recipe_yaml,
                             _flat_hparams(recipe))

    def _resume_folder(self) -> Path | None:
        from mlot_ds.engine.preflight import resume_folder

        return resume_folder(self.recipe)

    def _resume(self) -> None:
        folder = self.resume_folder
        if folder is None:
            return
        state = checkpoint.load(self.student, self.load_folder)
        self.global_step = int(state["global_step"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.best_value = state.get("best_value")
        self.weights.load_state_dict(state.get("weights", {}))
        dist.print0(f"resumed from {folder} at step {self.global_step}")

    # ------------------------------------------------------------------------------------- train
    def train(self) -> None:
        save_every = self.recipe.train.save_every
        eval_every = self.recipe.eval.every
        while self.global_step < self.total_steps:
            started = time.perf_counter()
            metrics = self.train_step(self.global_step)
            self.global_step += 1
            metrics["train/tokens_per_s"] = metrics.pop("_tokens") / max(time.perf_counter() - started, 1e-9)
            if self.global_step % self.recipe.train.log_every == 0 or self.global_step == self.total_steps:
                self.log.scalars(self.global_step, metrics)
            self.log.progress(self.global_step, metrics["train/loss"], metrics["train/tokens_per_s"])
            if eval_every and self.global_step % eval_every == 0 and self.global_step < self.total_steps:
                results = self.inputs.evaluate(self)
                self.log.scalars(self.global_step, results)
                self.keep_if_best(results)
            if dist.any_rank(STOP_REQUEST["signal"] is not None):
                self.save()
                self.log.message(f"stopped by signal at step {self.global_step}; checkpoint saved, exiting "
                                 f"with status {REQUEUE_EXIT_CODE} (requeue)")
                self.log.close()
                raise SystemExit(REQUEUE_EXIT_CODE)
            if save_every and self.global_step % save_every == 0 and self.global_step < self.total_steps:
                self.save()

    def train_step(self, step: int) -> dict[str, float]:
        epoch, index = divmod(step, self.data.steps_per_epoch)
        micro_batches = self.data.micro_batches(epoch, index)
        counts = self.data.global_counts(epoch, index)
        scale = self.world * self.recipe.train.grad_accum
        weights = dict(self.weights.current)
        lr = float(self.student.get_lr()[0])  # the rate this step uses (the scheduler moves on in step())
        # Metric sums stay on the device (float32) until one transfer at the end of the step.
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        skipped = False
        for batch in micro_batches:
            batch = batch.to(self.device)
            reduced, pairings = {}, {}
            for teacher in self.teachers:
                inputs = batch.teachers[teacher.name]
                teacher_loss = self.teacher_losses[teacher.name]
                pairings[teacher.name] = teacher_loss.pairing_for(batch.pairings[teacher.name],
                                                                  batch.student.labels, inputs.labels)
                # The teacher's logits live only inside this call: what leaves is the loss's summary.
                reduced[teacher.name], gold = self.teachers.reduce(
                    teacher, inputs, pairings[teacher.name], teacher_loss,
                    with_gold_ce=self.recipe.weighting.mode == "dynamic", record_ids=batch.record_ids)
                if gold is not None:
                    totals[f"_ce_sum/{teacher.name}"] += gold["ce"].detach().float()
                    totals[f"_ce_tokens/{teacher.name}"] += float(gold["tokens"])
            student = batch.student
            student_logits = self.student(input_ids=student.input_ids, attention_mask=student.attention_mask,
                                          use_cache=False).logits
            # The first MultiLevelOT teacher computes CE in the same pass over the student logits.
            fused = next((t.name for t in self.teachers if self.teacher_losses[t.name].fuses_ce), None)
            ce_sum = None if fused else losses.masked_ce(student_logits, student.labels)["ce"]
            loss = torch.zeros((), device=student_logits.device)
            for teacher in self.teachers:
                name = teacher.name
                teacher_loss = self.teacher_losses[name]
                terms = teacher_loss.terms(student_logits, reduced.pop(name), pairings[name],
                                           student_labels=student.labels if name == fused else None)
                if name == fused:
                    ce_sum = terms.pop("ce")
                denominator = max(counts[f"{name}/{teacher_loss.denominator}"], 1)
                kd = sum(teacher_loss.term_weights[t] * value for t, value in terms.items()) / denominator
                loss = loss + weights[name] * kd
                totals[f"teacher/{name}/kd"] += kd.detach().float()
                for term, value in terms.items():
                    totals[f"teacher/{name}/{term}"] += value.detach().float() / denominator
            ce = ce_sum / max(counts["student_tokens"], 1)
            loss = loss + self.recipe.train.ce_weight * ce
            totals["train/ce"] += ce.detach().float()
            if dist.any_rank(not bool(torch.isfinite(loss.detach()))):
                skipped = True
                loss = self._skipping_loss(student_logits)
            # Every rank must hold the same metric keys (they are all-reduced as one vector).
            totals["train/loss"] += 0.0 if skipped else loss.detach().float()
            self.student.backward(loss * scale)
            # DeepSpeed counts micro-steps in step(); it updates only at the accumulation boundary.
            self.student.step()
        if skipped:
            self._count_skip()
        return self._step_metrics(totals, counts, weights, skipped, lr)

    @staticmethod
    def _skipping_loss(student_logits: torch.Tensor) -> torch.Tensor:
        """A loss whose gradient is NaN everywhere, walking the whole graph.

        Every rank runs the same backward collectives, and ZeRO-3's own check of the global
        gradient norm (all-reduced, so every rank sees it) then skips the optimizer update on
        every rank: parameters, optimizer moments and the lr schedule stay as they were, with or
        without a scheduler in the DeepSpeed JSON.
        """
        return student_logits.sum() * float("nan")

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
            self.weights.update({n: values[f"_ce_sum/{n}"] for n in names},
                                {n: values[f"_ce_tokens/{n}"] for n in names})
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
        metrics["_tokens"] = float(counts["student_tokens"])
        return metrics

    # ------------------------------------------------------------------------------ save / cleanup
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
        dist.rank0_then_barrier(lambda: checkpoint.mark_best(self.checkpoint_dir, folder, metric, value))
        self.log.message(f"best {metric} = {value:.4f} at step {self.global_step}: {folder}")

    def save(self) -> Path:
        current = self.checkpoint_dir / checkpoint.tag_for(self.global_step)
        if checkpoint.find_latest(self.checkpoint_dir) == current:
            return current  # already saved at this step (e.g. as the best one)
        state = {"global_step": self.global_step, "consecutive_skips": self.consecutive_skips, "best_value": self.best_value,
                 "skipped_steps": self.skipped_steps, "weights": self.weights.state_dict(),
                 "steps_per_epoch": self.data.steps_per_epoch, "world_size": self.world,
                 "global_batch": self.recipe.train.micro_batch_size * self.recipe.train.grad_accum * self.world}
        folder = checkpoint.save(self.student, self.checkpoint_dir, self.global_step, state, self.recipe_yaml,
                                 self.manifest, self.recipe.train.keep_last)
        self.log.message(f"checkpoint: {folder}")
        return folder

    def export(self) -> Path:
        return checkpoint.export_hf(self.student, self.inputs.student_tokenizer, self.recipe.paths().export)

    def cleanup(self) -> None:
        self.log.close()


def _flat_hparams(recipe: Recipe) -> dict:
    hparams = {"lr": recipe.train.lr, "micro_batch_size": recipe.train.micro_batch_size,
               "grad_accum": recipe.train.grad_accum, "world_size": dist.world_size(),
               "weighting": recipe.weighting.mode, "student": recipe.student.model}
    for teacher in recipe.teachers:
        hparams[f"{teacher.name}/weight"] = teacher.weight
        hparams[f"{teacher.name}/loss"] = f"{teacher.loss.kind}:{teacher.loss.preset}"
        hparams[f"{teacher.name}/pairing"] = teacher.pairing
    return hparams
