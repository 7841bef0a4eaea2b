"""Checkpoint bookkeeping that needs no DeepSpeed run: manifests, the latest pointer, pruning."""

from __future__ import annotations

import json

import pytest

from mlot_ds.engine import checkpoint
from mlot_ds.engine.checkpoint import CheckpointError, check_compatible, check_manifest, find_latest


def manifest(**changes):
    teachers = [
        {"name": "llama", "model": "/m/llama", "tokenizer_hash": "aaaa", "loss": {"kind": "mlot"}, "pairing": "offsets"},
        {"name": "qwen", "model": "/m/qwen", "tokenizer_hash": "bbbb", "loss": {"kind": "mlot"}, "pairing": "offsets"},
    ]
    for key, value in changes.items():
        teachers[1][key] = value
    return {"teachers": teachers}


def fake_checkpoint(root, step, complete=True, **state):
    folder = root / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "world_size": 2,
                                                           "steps_per_epoch": 10, **state}))
    (folder / "teachers.json").write_text(json.dumps(manifest()))
    if complete:
        (folder / checkpoint.COMPLETE).write_text("ok\n")
    return folder


def test_same_teachers_pass_and_changes_are_refused_unless_allowed(tmp_path):
    check_manifest(manifest(), manifest(), tmp_path, allow_change=False)
    for change, word in ((dict(model="/m/other"), "model"), (dict(tokenizer_hash="cccc"), "tokenizer_hash"),
                         (dict(loss={"kind": "uld"}), "loss"), (dict(pairing="dtw"), "pairing")):
        with pytest.raises(CheckpointError, match=f"teacher 'qwen' changed its {word}"):
            check_manifest(manifest(), manifest(**change), tmp_path, allow_change=False)
        check_manifest(manifest(), manifest(**change), tmp_path, allow_change=True)
    fewer = {"teachers": manifest()["teachers"][:1]}
    with pytest.raises(CheckpointError, match=r"saved with teachers \['llama', 'qwen'\] but this run has \['llama'\]"):
        check_manifest(manifest(), fewer, tmp_path, allow_change=False)


def test_latest_pointer_ignores_incomplete_folders(tmp_path):
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 6)
    fake_checkpoint(tmp_path, 9, complete=False)  # a crash mid-save
    assert find_latest(tmp_path).name == "step_00000006"
    (tmp_path / "latest").write_text("step_00000009\n")  # pointer to an incomplete one: fall back
    assert find_latest(tmp_path).name == "step_00000006"
    (tmp_path / "latest").write_text("step_00000003\n")
    assert find_latest(tmp_path).name == "step_00000003"
    assert find_latest(tmp_path / "nothing-here") is None


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, complete=False)
    checkpoint._prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004", "step_00000005"]


def test_world_size_and_data_changes_are_clear_errors_before_loading(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    check_compatible(folder, manifest(), False, world_size=2, steps_per_epoch=10)
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):
        check_compatible(folder, manifest(), False, world_size=1, steps_per_epoch=10)
    with pytest.raises(CheckpointError, match="saved with 10 steps per epoch, this run has 7"):
        check_compatible(folder, manifest(), False, world_size=2, steps_per_epoch=7)
    incomplete = fake_checkpoint(tmp_path, 8, complete=False)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        check_compatible(incomplete, manifest(), False, world_size=2, steps_per_epoch=10)


def test_a_world_size_change_is_accepted_when_resharding_if_the_global_batch_is_kept(tmp_path):
    folder = fake_checkpoint(tmp_path, 4, global_batch=8)
    with pytest.raises(CheckpointError, match="or set train.reshard_on_resume=true"):
        check_compatible(folder, manifest(), False, world_size=4, steps_per_epoch=10)
    check_compatible(folder, manifest(), False, world_size=4, steps_per_epoch=10, reshard=True)
    with pytest.raises(CheckpointError, match="with 4 ranks keep the global batch of 8 records"):
        check_compatible(folder, manifest(), False, world_size=4, steps_per_epoch=5, reshard=True)
    assert checkpoint.saved_world_size(folder) == 2 and checkpoint.saved_world_size(tmp_path) is None


def test_a_failed_universal_conversion_leaves_the_checkpoint_as_it_was(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)  # no DeepSpeed shards: the converter cannot work on it
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    with pytest.raises(CheckpointError, match="conversion to the universal format failed"):
        checkpoint.universal_copy(folder)
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no staging folder left


def test_folder_hash_changes_with_tokenizer_content(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    first = checkpoint.folder_hash(tmp_path)
    (tmp_path / "model.safetensors").write_text("weights do not count")
    assert checkpoint.folder_hash(tmp_path) == first
    (tmp_path / "tokenizer.json").write_text('{"a": 2}')
    assert checkpoint.folder_hash(tmp_path) != first


def test_prune_never_removes_the_best_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    checkpoint.mark_best(tmp_path, tmp_path / checkpoint.tag_for(1), "eval/rouge_lsum", 12.5)
    checkpoint._prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001", "step_00000004"]
    assert (tmp_path / "best").read_text().split() == ["step_00000001", "eval/rouge_lsum", "12.5"]
