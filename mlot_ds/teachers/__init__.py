"""Frozen teachers under DeepSpeed: partitioned loading and a fixed-order forward pool."""

from mlot_ds.teachers.pool import Teacher, TeacherPool

__all__ = ["Teacher", "TeacherPool"]
