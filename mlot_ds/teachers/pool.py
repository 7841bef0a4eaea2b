"""Frozen teachers: one no-optimizer DeepSpeed engine each (or a plain replica), run in a fixed order.

Collective discipline: :meth:`TeacherPool.forward` is called by every rank for every micro-batch,
and runs every teacher, in the recipe's order, exactly once. Nothing here branches on rank, so the
ZeRO-3 parameter gathers line up across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlot_ds.config import TeacherConfig
from mlot_ds.engine.ds_config import teacher_ds_config
from mlot_ds.teachers.loading import load_causal_lm, resolve_dtype


@dataclass
class Teacher:
    name: str
    config: TeacherConfig
    module: torch.nn.Module
    """A DeepSpeed inference engine (``shard``/``offload``) or the model itself (``replicate``)."""
    model_path: str


class TeacherPool:
    """The teachers of a run, loaded partitioned and frozen."""

    def __init__(self, teachers: list[Teacher], device: torch.device):
        self.teachers = teachers
        self.device = device

    @classmethod
    def load(cls, configs: list[TeacherConfig], model_paths: list[str], student_ds_config: dict,
             micro_batch_size: int, device: torch.device) -> "TeacherPool":
        import deepspeed

        bf16 = bool(student_ds_config.get("bf16", {}).get("enabled", False))
        teachers = []
        for index, (config, path) in enumerate(zip(configs, model_paths)):
            where = f"teachers[{index}] ({config.name})"
            dtype = resolve_dtype(config.dtype, bf16)
            if config.placement == "replicate":
                model = load_causal_lm(path, dtype=dtype, trust_remote_code=config.trust_remote_code,
                                       ds_config=None, where=where)
                module = model.to(device)
            else:
                ds_config = teacher_ds_config(student_ds_config, config.placement, micro_batch_size)
                model = load_causal_lm(path, dtype=dtype, trust_remote_code=config.trust_remote_code,
                                       ds_config=ds_config, where=where)
                module, *_ = deepspeed.initialize(model=model, config=ds_config)
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            teachers.append(Teacher(config.name, config, module, str(path)))
        return cls(teachers, device)

    def __iter__(self):
        return iter(self.teachers)

    def __len__(self) -> int:
        return len(self.teachers)

    @torch.no_grad()
    def logits(self, teacher: Teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One teacher's logits ``[B, T, m]``."""
        output = teacher.module(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                use_cache=False)
        return output.logits

    @torch.no_grad()
    def reduce(self, teacher: Teacher, inputs, pairing, teacher_loss, *, with_gold_ce: bool):
        """Run one teacher and keep only what its loss needs (and, for dynamic weights, its summed
        cross-entropy on the gold response). The full logits are freed before this returns."""
        from mlot_ds.losses import masked_ce

        logits = self.logits(teacher, inputs.input_ids, inputs.attention_mask)
        reduced = teacher_loss.reduce(logits, pairing)
        gold = masked_ce(logits, inputs.labels.to(logits.device)) if with_gold_ce else None
        del logits
        return reduced, gold
