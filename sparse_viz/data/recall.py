"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): sequences with ground truth.

A sequence of `seq_len + 1` tokens (inputs = tokens[:-1], targets = tokens[1:], as for text):

    k1 v1 k2 v2 ... kN vN   f f f ... f   kq1 vq1 kq2 vq2 ... kqQ vqQ
    |--- N key-value pairs ---|-- filler --|--- Q queries (placement "end") ---|

Each query repeats one earlier key (Q distinct keys among the N); the model must predict the
value paired with it at the next position, so the loss counts at the query's key position only
(the "answer position"). The ground truth of an answer position is where its pair sits: the
position of the matching key and of its value token. Under causal attention only the value's
position (or a later one that copied it) can carry the answer.

Vocabulary (ids): 0 = filler, keys 1 .. n_keys, values n_keys + 1 .. vocab_size - 1, with
n_keys = (vocab_size - 1) // 2. Keys and values are distinct within a sequence, so a value
token appears in the input only at its pair and right after the query that asks for it.

Placements of the queries after the pairs:
    end     the last 2Q tokens (the default): every query is at least seq_len + 1 - 2N - 2Q
            positions after its pair, farther than any local window shorter than that.
    random  Q two-token slots drawn uniformly among the slots after the pairs (Zoology-like),
            filler elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILLER_ID = 0
PLACEMENTS = ("end", "random")


@dataclass(frozen=True)
class RecallSpec:
    """The shape of an MQAR task.

    Args:
        vocab_size: ids in the task (>= 5): filler, keys and values (see the module docstring).
        num_pairs: key-value pairs at the start of each sequence (1 .. n_keys and n_values).
        num_queries: queries per sequence (1 .. num_pairs), each a distinct earlier key.
        seq_len: tokens the model sees; the sequence holds seq_len + 1 tokens, which must fit
            2 * num_pairs + 2 * num_queries.
        placement: where the queries sit after the pairs: `end` or `random`.
    """

    vocab_size: int = 64
    num_pairs: int = 8
    num_queries: int = 4
    seq_len: int = 512
    placement: str = "end"

    @property
    def n_keys(self) -> int:
        return (self.vocab_size - 1) // 2

    @property
    def n_values(self) -> int:
        return self.vocab_size - 1 - self.n_keys

    @property
    def first_value_id(self) -> int:
        return 1 + self.n_keys

    def validate(self) -> None:
        """Raise `ValueError` naming the first option that makes the task impossible."""
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size must be >= 5 (filler + 2 keys + 2 values), got {self.vocab_size}")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.num_pairs > min(self.n_keys, self.n_values):
            raise ValueError(
                f"num_pairs={self.num_pairs} needs {self.num_pairs} distinct keys and values, but "
                f"vocab_size={self.vocab_size} has {self.n_keys} key and {self.n_values} value ids"
            )
        if not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(f"num_queries must be in [1, num_pairs={self.num_pairs}], got {self.num_queries}")
        needed = 2 * self.num_pairs + 2 * self.num_queries
        if self.seq_len + 1 < needed:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for {self.num_pairs} pairs and {self.num_queries} "
                f"queries: they need seq_len + 1 >= {needed}"
            )


@dataclass
class RecallExample:
    """One generated sequence.

    Attributes:
        tokens: (seq_len + 1,) int64; inputs tokens[:-1], targets tokens[1:].
        loss_mask: (seq_len,) bool, True at the answer positions (input index of a query key,
            whose target is the value).
        ground_truth: (seq_len, 2) int64, at an answer position [key position, value position]
            of its pair, -1 elsewhere.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    ground_truth: np.ndarray


def query_starts(spec: RecallSpec, rng: np.random.Generator) -> np.ndarray:
    """(Q,) int64 sorted positions of the query keys in the sequence (each followed by its value)."""
    Q, first = spec.num_queries, 2 * spec.num_pairs
    if spec.placement == "end":
        return np.arange(spec.seq_len + 1 - 2 * Q, spec.seq_len + 1, 2, dtype=np.int64)
    n_slots = (spec.seq_len + 1 - first) // 2
    slots = np.sort(rng.choice(n_slots, size=Q, replace=False))
    return first + 2 * slots.astype(np.int64)


def generate_example(spec: RecallSpec, rng: np.random.Generator) -> RecallExample:
    """Draw one MQAR sequence from `rng` (the spec must be valid)."""
    N, Q, T = spec.num_pairs, spec.num_queries, spec.seq_len
    keys = 1 + rng.choice(spec.n_keys, size=N, replace=False)  # (N,)
    values = spec.first_value_id + rng.choice(spec.n_values, size=N, replace=False)  # (N,)
    tokens = np.full(T + 1, FILLER_ID, dtype=np.int64)
    tokens[0 : 2 * N : 2] = keys
    tokens[1 : 2 * N : 2] = values
    asked = rng.choice(N, size=Q, replace=False)  # (Q,) which pair each query asks for
    starts = query_starts(spec, rng)  # (Q,)
    tokens[starts] = keys[asked]
    tokens[starts + 1] = values[asked]
    loss_mask = np.zeros(T, dtype=bool)
    loss_mask[starts] = True
    ground_truth = np.full((T, 2), -1, dtype=np.int64)
    ground_truth[starts, 0] = 2 * asked
    ground_truth[starts, 1] = 2 * asked + 1
    return RecallExample(tokens=tokens, loss_mask=loss_mask, ground_truth=ground_truth)
