"""Checkpoints keep every rank's random streams and the stream positions, loadable with weights_only;
they are verified against the sizes and checksums they recorded."""

import re

import pytest
import torch

from pipelines.pretrain.checkpoints import (
    POINTER_NAME,
    STATE_FILE,
    TRAIN_DIR,
    DamagedCheckpoint,
    RankRandomState,
    TrainingState,
    checkpoint_name,
    checkpoints_not_after,
    list_checkpoints,
    load_checkpoint,
    newest_checkpoint_name,
    newest_intact_checkpoint,
    newest_recorded_checkpoint,
    read_pointer,
    save_checkpoint,
    verify_checkpoint,
)


def _draws(photometric: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(3), torch.rand(3, generator=photometric)


def test_every_rank_gets_back_its_own_random_streams(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generators = [torch.Generator().manual_seed(1000 + rank) for rank in range(2)]
    states = []
    for rank, generator in enumerate(generators):  # each "rank" has advanced its streams differently
        torch.manual_seed(rank)
        torch.rand(rank + 1)
        torch.rand(rank + 5, generator=generator)
        states.append(RankRandomState.capture(generator, torch.device("cpu")))
    expected = []
    for state, generator in zip(states, generators):
        state.restore(generator, torch.device("cpu"))
        expected.append(_draws(generator))
    training = TrainingState(step=7, stream_layout={"num_units": 3}, stream_positions=[5, -1])
    save_checkpoint(tmp_path, model, optimizer, training, {"a": 1}, states)

    restored, random_states = load_checkpoint(tmp_path, torch.nn.Linear(2, 2), None)
    assert restored.step == 7 and restored.stream_positions == [5, -1] and len(random_states) == 2
    for rank in (1, 0):
        generator = torch.Generator()
        random_states[rank].restore(generator, torch.device("cpu"))
        drawn = _draws(generator)
        assert torch.equal(drawn[0], expected[rank][0]) and torch.equal(drawn[1], expected[rank][1])
    assert not torch.equal(expected[0][1], expected[1][1])  # the ranks' streams differ


def _write_run(run_dir, steps) -> list:
    """Checkpoints of a tiny model at ``steps`` under ``run_dir/train``; their paths, newest first."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        state = TrainingState(step=step, total_steps=8)
        save_checkpoint(run_dir / TRAIN_DIR / checkpoint_name(step), model, optimizer, state, {"a": 1})
    return list_checkpoints(str(run_dir))


def test_checkpoints_record_their_files_and_are_verified(tmp_path):
    (newest, older) = _write_run(tmp_path, [2, 4])
    assert newest.endswith("checkpoint_step000000004") and verify_checkpoint(newest).step == 4
    model_file = tmp_path / TRAIN_DIR / "checkpoint_step000000004" / "model.pt"
    size = model_file.stat().st_size
    model_file.write_bytes(model_file.read_bytes()[: size // 2])  # truncated
    with pytest.raises(DamagedCheckpoint, match=re.escape(f"{model_file} has {size // 2} bytes, {size} when written")):
        verify_checkpoint(newest)
    with pytest.raises(DamagedCheckpoint, match="model.pt has"):
        load_checkpoint(tmp_path / TRAIN_DIR / "checkpoint_step000000004", torch.nn.Linear(2, 2), None)
    altered = bytearray((tmp_path / TRAIN_DIR / "checkpoint_step000000002" / "model.pt").read_bytes())
    altered[-1] ^= 0xFF  # same size, one bit pattern changed
    (tmp_path / TRAIN_DIR / "checkpoint_step000000002" / "model.pt").write_bytes(bytes(altered))
    with pytest.raises(DamagedCheckpoint, match="does not match the SHA-256"):
        verify_checkpoint(older)


def test_the_newest_intact_checkpoint_is_chosen_and_the_damaged_ones_named(tmp_path):
    paths = _write_run(tmp_path, [2, 4, 6])
    (tmp_path / TRAIN_DIR / "checkpoint_step000000006" / "model.pt").write_bytes(b"")
    (tmp_path / TRAIN_DIR / "checkpoint_step000000004" / STATE_FILE).unlink()  # never completely written
    found = newest_intact_checkpoint(paths)
    assert found.path == paths[2] and found.state.step == 2 and found.damaged_paths == tuple(paths[:2])
    assert "checkpoint_step000000006/model.pt has 0 bytes" in found.damaged[0]
    assert "checkpoint_step000000004/state.json is missing" in found.damaged[1]
    (tmp_path / TRAIN_DIR / "checkpoint_step000000002" / "training_state.pt").unlink()
    with pytest.raises(DamagedCheckpoint, match=r"no intact checkpoint: .*step000000006/model.pt .*2 older"):
        newest_intact_checkpoint(paths)
    assert newest_intact_checkpoint([]) is None


def test_checkpoint_directories_are_ordered_by_step_then_attempt(tmp_path):
    for name in ["checkpoint_step000000004", "checkpoint_step000000010", "checkpoint_step000000004-1", "other"]:
        (tmp_path / TRAIN_DIR / name).mkdir(parents=True)
    names = [path.rsplit("/", 1)[1] for path in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint_step000000010", "checkpoint_step000000004-1", "checkpoint_step000000004"]
    older = [path.rsplit("/", 1)[1] for path in checkpoints_not_after(str(tmp_path), "checkpoint_step000000004-1")]
    assert older == names[1:]
    assert list_checkpoints(str(tmp_path / "nothing")) == []


def test_a_restart_takes_the_newest_of_ray_trains_checkpoint_and_the_pointer():
    # The pointer is written once the checkpoint is in storage, possibly before Ray Train registers it.
    registered = "/runs/a/train/checkpoint_step000000004"
    pointer = "s3://bucket/runs/a/train/checkpoint_step000000006/"
    assert newest_checkpoint_name(registered, None, pointer) == "checkpoint_step000000006"
    assert newest_checkpoint_name(pointer, "checkpoint_step000000006-1", None) == "checkpoint_step000000006-1"
    assert newest_checkpoint_name(None, None, None) is None


def test_a_garbage_pointer_file_is_named(tmp_path):
    (tmp_path / POINTER_NAME).write_text("\x00\x00garbage")
    with pytest.raises(DamagedCheckpoint, match=re.escape(f"{tmp_path / POINTER_NAME} is not valid JSON")):
        read_pointer(str(tmp_path))
    (tmp_path / POINTER_NAME).write_text("[1, 2]")
    with pytest.raises(DamagedCheckpoint, match="does not name a checkpoint"):
        read_pointer(str(tmp_path))
    _write_run(tmp_path, [2, 4])  # messages fall back on the newest checkpoint directory
    assert newest_recorded_checkpoint(str(tmp_path)) == (str(tmp_path / TRAIN_DIR / "checkpoint_step000000004"), 4)
