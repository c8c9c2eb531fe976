"""Checkpoints keep every rank's random streams and the stream positions, loadable with weights_only."""

import torch

from pipelines.pretrain.checkpoints import RankRandomState, TrainingState, load_checkpoint, save_checkpoint


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
