"""Synthetic permutation tasks: sequences that a tiny model learns quickly and forgets measurably.

Task ``k`` draws its own permutation ``pi_k`` of the tokens ``[FIRST_TOKEN, FIRST_TOKEN + vocab)``; a
sequence starts at a uniform token ``x0`` and follows ``x_{i+1} = pi_k(x_i)``. Everything is a pure
function of ``(seed, task name)``.
"""

import zlib

import numpy as np

FIRST_TOKEN = 3
"""Ids below this are left free for pad / eos / bos, so synthetic and tokenizer ids can share a model."""


def task_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one synthetic task: the same ``(seed, name)`` gives the same stream anywhere."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def task_permutation(seed: int, name: str, vocab: int) -> np.ndarray:
    """The task's next-token map over ``[FIRST_TOKEN, FIRST_TOKEN + vocab)``, as token ids, shape
    ``(vocab,)``.

    ``task_permutation(...)[x - FIRST_TOKEN]`` is the token that follows ``x``.
    """
    return task_rng(seed, name).permutation(vocab) + FIRST_TOKEN


def permutation_sequences(
    seed: int, name: str, num_examples: int, length: int, vocab: int, jump_prob: float = 0.0, stream: int = 0
) -> np.ndarray:
    """``num_examples`` sequences of ``length`` token ids following the task's permutation, ``(N, L)`` int64.

    The permutation is drawn before the start tokens from the same generator, so it does not
    depend on ``num_examples`` or ``length``. With ``jump_prob = 0`` a sequence is determined by its
    start token (at most ``vocab`` distinct sequences, so a holdout set would repeat training
    sequences); with ``jump_prob > 0`` each step jumps to a uniform token with that probability,
    which makes sequences distinct while the permutation stays the learnable rule.

    ``stream`` > 0 draws the sequences from another generator, ``(seed, name, stream)``, over the
    same permutation: more sequences of the task (e.g. a test set) that leave stream 0's unchanged.
    """
    if not 0.0 <= jump_prob < 1.0:
        raise ValueError(f"jump_prob must lie in [0, 1), got {jump_prob}")
    if num_examples < 0 or length < 1 or vocab < 1:
        raise ValueError(
            f"need num_examples >= 0, length >= 1, vocab >= 1; got {num_examples}, {length}, {vocab}"
        )
    rng = task_rng(seed, name)
    perm = rng.permutation(vocab)
    if stream:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), stream])
    seqs = np.empty((num_examples, length), dtype=np.int64)
    seqs[:, 0] = rng.integers(0, vocab, size=num_examples)
    jumps = rng.random((num_examples, length)) < jump_prob  # (N, L); column 0 unused
    targets = rng.integers(0, vocab, size=(num_examples, length))
    for i in range(1, length):
        seqs[:, i] = np.where(jumps[:, i], targets[:, i], perm[seqs[:, i - 1]])
    return seqs + FIRST_TOKEN
