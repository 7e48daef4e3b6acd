"""Batch sampling: :class:`TaskLoader` (shuffling, length bucketing, resume, sharding over ranks)."""
from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .batch import Batch
from .files import TaskData
from .example import Example

__all__ = ["TaskLoader"]


def _word_length(ex: Example) -> int:
    return len(ex.text_a.split()) + (len(ex.text_b.split()) if ex.text_b else 0)


class TaskLoader:
    """Iterable of :class:`Batch` over one task's examples: shuffling, length bucketing, resume, sharding.

    Order. Each epoch builds a list of *global batches* of ``batch_size * world_size`` example
    indices, the same on every rank: a permutation seeded by ``(seed, epoch)`` (or file order when
    ``shuffle=False``); with ``bucket_by_length`` the permutation is cut into chunks of
    ``bucket_chunk`` global batches, each chunk is sorted by length (``length_fn``, default: words in
    text_a and text_b) and cut into global batches, and then the order of all global batches is
    shuffled (seeded). Sorting within chunks keeps similar lengths together, so dynamic padding
    pads less, while chunking and shuffling keep the batches random.

    Sharding. Rank ``r`` of ``world_size`` takes rows ``r::world_size`` of every global batch, so
    the ranks together see exactly the batches a single process with ``batch_size * world_size``
    would see, and every rank yields the same number of batches. Exception: a last global batch
    with fewer rows than ranks gives the surplus ranks a repeat of one of its rows (so none is empty);
    ``drop_last=True`` drops the incomplete last global batch instead.

    Augmentation. ``swap_pairs=True`` (pair tasks) swaps the two sentences of a seeded half of the
    examples each epoch (:meth:`swapped`): paraphrase and similarity are symmetric, so a
    cross-encoder sees both orders of a pair over the run.

    Epochs and resume. Iterating runs the rest of the current epoch, then advances ``epoch`` by one.
    ``set_epoch(e)`` moves to the start of epoch ``e`` (it keeps the position when ``e`` is already
    the current epoch, so ``load_state_dict`` followed by ``set_epoch`` of the same epoch resumes
    mid-epoch). ``state_dict()`` holds ``(epoch, batch_index)``; ``load_state_dict`` restores it and
    checks that the data and sampling options are the same. One iterator at a time: starting a new
    one invalidates the previous.
    """

    def __init__(
        self,
        examples: Union[Sequence[Example], TaskData],
        batch_size: int,
        collate: Callable[[List[Example]], Batch],
        *,
        shuffle: bool = True,
        seed: int = 0,
        bucket_by_length: bool = False,
        bucket_chunk: int = 50,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        length_fn: Optional[Callable[[Example], int]] = None,
        swap_pairs: bool = False,
    ):
        if isinstance(examples, TaskData):
            examples = examples.examples
        self.examples = list(examples)
        for name, value, low in (("batch_size", batch_size, 1), ("bucket_chunk", bucket_chunk, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TaskLoader: {name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"TaskLoader: rank must be < world_size ({world_size}), got {rank}")
        if not callable(collate):
            raise TypeError(f"TaskLoader: collate must be callable, got {type(collate).__name__}")
        if not self.examples:
            raise ValueError("TaskLoader: no examples")
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.global_batch_size = batch_size * world_size
        if drop_last and len(self.examples) < self.global_batch_size:
            raise ValueError(f"TaskLoader: drop_last with {len(self.examples)} examples and a global batch of "
                             f"{self.global_batch_size} leaves no batch")
        self.collate = collate
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.bucket_by_length = bool(bucket_by_length)
        self.bucket_chunk = bucket_chunk
        self.drop_last = bool(drop_last)
        self.length_fn = length_fn or _word_length
        self.swap_pairs = bool(swap_pairs)
        if self.swap_pairs and any(ex.text_b is None for ex in self.examples):
            raise ValueError("TaskLoader: swap_pairs needs pair examples (text_b), but some rows have one sentence")
        self._swap_cache: Tuple[int, Optional[List[bool]]] = (-1, None)
        self.epoch = 0
        self._batch_index = 0
        self._generation = 0
        self._cache: Tuple[int, List[List[int]]] = (-1, [])
        self._fingerprint = zlib.crc32("\n".join(f"{ex.task}\t{ex.id}" for ex in self.examples).encode("utf-8"))

    # ---- order ----
    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + epoch * 2 + stream) % (2 ** 63))
        return g

    def global_batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """The global batches (lists of example indices) of an epoch, identical on all ranks."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache[0] == epoch:
            return self._cache[1]
        n, gbs = len(self.examples), self.global_batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(epoch, 0)).tolist()
        else:
            order = list(range(n))
        if self.bucket_by_length:
            lengths = [self.length_fn(ex) for ex in self.examples]
            chunk = self.bucket_chunk * gbs
            order = [i for s in range(0, n, chunk) for i in sorted(order[s:s + chunk], key=lengths.__getitem__)]
        batches = [order[s:s + gbs] for s in range(0, n, gbs)]
        if self.drop_last and len(batches[-1]) < gbs:
            batches.pop()
        if self.bucket_by_length and self.shuffle:
            perm = torch.randperm(len(batches), generator=self._generator(epoch, 1)).tolist()
            batches = [batches[i] for i in perm]
        self._cache = (epoch, batches)
        return batches

    def rank_rows(self, global_batch: List[int]) -> List[int]:
        """This rank's rows of a global batch: ``global_batch[rank::world_size]``."""
        rows = global_batch[self.rank::self.world_size]
        if not rows:  # fewer rows than ranks: repeat one so that no rank gets an empty batch
            rows = [global_batch[self.rank % len(global_batch)]]
        return rows

    def __len__(self) -> int:
        """Batches per epoch (on every rank)."""
        n, gbs = len(self.examples), self.global_batch_size
        return n // gbs if self.drop_last else -(-n // gbs)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def batch_index(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._batch_index

    def swapped(self, epoch: Optional[int] = None) -> List[bool]:
        """``swap_pairs``: which examples have their two sentences swapped in ``epoch`` (a seeded,
        per-epoch draw, the same on every rank, so a resumed run swaps the same rows)."""
        epoch = self.epoch if epoch is None else epoch
        if self._swap_cache[0] != epoch:
            draw = torch.rand(len(self.examples), generator=self._generator(epoch, 2)) < 0.5
            self._swap_cache = (epoch, draw.tolist())
        return self._swap_cache[1]

    def example(self, index: int) -> Example:
        """Example ``index`` as this epoch yields it (with ``swap_pairs``, possibly swapped)."""
        ex = self.examples[index]
        if self.swap_pairs and self.swapped()[index]:
            ex = replace(ex, text_a=ex.text_b, text_b=ex.text_a)
        return ex

    # ---- iteration ----
    def __iter__(self) -> Iterator[Batch]:
        self._generation += 1
        return self._run(self._generation)

    def _run(self, generation: int) -> Iterator[Batch]:
        batches = self.global_batches(self.epoch)
        while self._batch_index < len(batches):
            if generation != self._generation:
                raise RuntimeError("TaskLoader: this iterator was superseded by a newer iter() "
                                   "or set_epoch/load_state_dict")
            rows = self.rank_rows(batches[self._batch_index])
            batch = self.collate([self.example(i) for i in rows])
            self._batch_index += 1
            yield batch
        if generation == self._generation:
            self.epoch += 1
            self._batch_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch`` (kept as is when it is the current epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"TaskLoader.set_epoch: epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch = epoch
            self._batch_index = 0
            self._generation += 1

    # ---- checkpointing ----
    def _options(self) -> Dict[str, object]:
        return {
            "num_examples": len(self.examples), "fingerprint": self._fingerprint, "seed": self.seed,
            "batch_size": self.batch_size, "world_size": self.world_size, "shuffle": self.shuffle,
            "bucket_by_length": self.bucket_by_length, "bucket_chunk": self.bucket_chunk, "drop_last": self.drop_last,
            "swap_pairs": self.swap_pairs,
        }

    def state_dict(self) -> Dict[str, object]:
        """Position (epoch, batch_index) plus the options that determine the order."""
        return {"epoch": self.epoch, "batch_index": self._batch_index, **self._options()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Resume at the saved position; the data and sampling options must be those it was saved with."""
        for key in ("epoch", "batch_index"):
            if key not in state:
                raise KeyError(f"TaskLoader.load_state_dict: state has no {key!r}")
        for key, value in self._options().items():
            if key in state and state[key] != value:
                raise ValueError(f"TaskLoader.load_state_dict: saved {key}={state[key]!r} but this loader has {value!r}; "
                                 f"the batch order would differ")
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ValueError(f"TaskLoader.load_state_dict: position epoch={epoch}, batch_index={index} is out of range "
                             f"({len(self)} batches per epoch)")
        self.epoch, self._batch_index = epoch, index
        self._generation += 1
