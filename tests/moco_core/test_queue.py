import pytest
import torch

from moco_core.queue import KeyQueue


def _reference_fifo(size, dim, batches):
    """The queue as a plain list of rows written one key at a time."""
    rows, pointer = [None] * size, 0
    for batch in batches:
        for key in batch:
            rows[pointer] = key
            pointer = (pointer + 1) % size
    return rows, pointer


@pytest.mark.parametrize("size,batch_sizes", [(10, [3, 3, 3, 3, 3]), (8, [5, 7, 2, 9]), (6, [6, 6]), (5, [13, 1, 4])])
def test_enqueue_wraps_around_for_batches_that_do_not_divide_k(size, batch_sizes):
    queue = KeyQueue(size, 4)
    initial = queue.keys.clone()
    batches = [torch.randn(n, 4) for n in batch_sizes]
    for batch in batches:
        queue.enqueue(batch)
    rows, pointer = _reference_fifo(size, 4, batches)
    assert int(queue.pointer) == pointer
    for slot, row in enumerate(rows):
        expected = initial[slot] if row is None else row
        torch.testing.assert_close(queue.keys[slot], expected)


def test_enqueue_never_reads_the_queue_on_the_host():
    """On a GPU a host read of the pointer waits for the device every step. A queue on the
    ``meta`` device (shapes only, no data) fails on any such read."""
    queue = KeyQueue(10, 4).to("meta")
    for count in (3, 12):
        queue.enqueue(torch.empty(count, 4, device="meta"))  # raises if the pointer is read


def test_every_enqueued_key_is_kept_until_k_newer_ones_arrive():
    queue = KeyQueue(7, 2)
    stream = torch.arange(40, dtype=torch.float32).repeat(2, 1).T  # 40 distinct keys
    for start, n in [(0, 3), (3, 5), (8, 4), (12, 9), (21, 6)]:
        queue.enqueue(stream[start : start + n])
    newest = {float(v) for v in stream[27 - 7 : 27, 0]}
    assert {float(v) for v in queue.keys[:, 0]} == newest


def test_queue_is_in_state_dict_and_round_trips():
    queue = KeyQueue(9, 3)
    queue.enqueue(torch.randn(4, 3))
    state = queue.state_dict()
    assert set(state) == {"keys", "pointer"}
    restored = KeyQueue(9, 3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.keys, queue.keys)
    assert int(restored.pointer) == 4


def test_initial_keys_are_unit_vectors_and_shape_is_checked():
    queue = KeyQueue(16, 5)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(16))
    with pytest.raises(ValueError, match="shape"):
        queue.enqueue(torch.randn(3, 4))
    with pytest.raises(ValueError):
        KeyQueue(0, 5)
