"""The train sampler the TRL callback installs: TRL's index layout, over each round's rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from gradalign.data.problems import Stream, round_seed


class RoundSampler(Sampler[int]):
    """TRL's `RepeatSampler` index stream, over each round's selected rows only.

    Per round r, with G = ``num_generations``, B = ``batch_size`` (distinct prompts per
    generation batch), R = ``repeat_count`` and U = ``generation_batches``:

    - ``select_round(r)`` is called when the first index of round r is requested, never
      earlier: the stream is a generator, so a round's rows are chosen lazily;
    - the chosen rows are shuffled (seeded per round: `Stream.TRAIN`) and cycled to fill
      U * B slots;
    - each generation batch of B rows is emitted R times in a row, each row G times in a row
      (TRL: ``mini_repeat_count=G``, ``batch_size=generation_batch_size // G``,
      ``repeat_count=num_iterations * steps_per_generation``), so generation batches are whole
      and every prompt comes in whole groups.

    One iteration yields ``rounds`` rounds; round numbers continue across iterations
    (epochs) from ``first_round``.
    """

    def __init__(
        self,
        select_round: Callable[[int], Sequence[int]],
        num_generations: int,
        batch_size: int,
        repeat_count: int,
        generation_batches: int,
        rounds: int,
        seed: int = 0,
        first_round: int = 0,
    ) -> None:
        self.select_round = select_round
        self.num_generations = num_generations
        self.batch_size = batch_size
        self.repeat_count = repeat_count
        self.generation_batches = generation_batches
        self.rounds = rounds
        self.seed = seed
        self.next_round = first_round

    @property
    def round_length(self) -> int:
        return self.generation_batches * self.repeat_count * self.batch_size * self.num_generations

    def __len__(self) -> int:
        return self.rounds * self.round_length

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.rounds):
            r, self.next_round = self.next_round, self.next_round + 1
            chosen = [int(i) for i in self.select_round(r)]
            if not chosen:
                raise ValueError(f"round {r}: the selection is empty")
            yield from self.round_indices(r, chosen)

    def round_indices(self, r: int, chosen: Sequence[int]) -> Iterator[int]:
        rng = np.random.default_rng(round_seed(self.seed, r, Stream.TRAIN))
        slots = self.generation_batches * self.batch_size
        order: list[int] = []
        while len(order) < slots:
            order.extend(int(i) for i in rng.permutation(chosen))
        for u in range(self.generation_batches):
            batch = order[u * self.batch_size : (u + 1) * self.batch_size]
            for _ in range(self.repeat_count):
                for index in batch:
                    yield from [index] * self.num_generations
