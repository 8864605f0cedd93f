"""Data order: epochs are permutations, positions resume, shards tile.

docs/DESIGN.md decision 5. Pure numpy; the pipeline-level versions of these properties
(through train_batches and eval_batches) are in test_pipeline.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ibs.data import order

fast = settings(max_examples=40, deadline=None)


@fast
@given(seed=st.integers(0, 2**32), epoch=st.integers(0, 1000), n=st.integers(1, 3000))
def test_every_epoch_is_a_permutation(seed, epoch, n):
  positions = np.arange(epoch * n, (epoch + 1) * n)
  indices = order.example_indices(seed, positions, n)
  np.testing.assert_array_equal(np.sort(indices), np.arange(n))


def test_epochs_and_seeds_give_different_orders():
  n = 1000
  first = order.example_indices(0, np.arange(n), n)
  second = order.example_indices(0, np.arange(n, 2 * n), n)
  other_seed = order.example_indices(1, np.arange(n), n)
  assert (first != second).mean() > 0.9
  assert (first != other_seed).mean() > 0.9
  np.testing.assert_array_equal(first, order.example_indices(0, np.arange(n), n))


@pytest.mark.parametrize(
  'positions',
  [
    np.arange(80, 110),  # inside one epoch
    np.arange(100, 190),  # across two epoch boundaries (B > N)
    np.random.default_rng(0).integers(0, 10 * 37, 200),  # unordered, repeated
  ],
)
def test_position_holds_its_epochs_seeded_permutation(positions):
  """The documented order, written out: perm_e = default_rng([seed, e]).permutation(N)."""
  seed, n = 9, 37
  expected = [
    np.random.default_rng([seed, s // n]).permutation(n)[s % n] for s in positions
  ]
  np.testing.assert_array_equal(order.example_indices(seed, positions, n), expected)


@fast
@given(
  seed=st.integers(0, 1000),
  n=st.integers(1, 500),
  start=st.integers(0, 5000),
  length=st.integers(1, 2000),
  cut=st.integers(0, 2000),
)
def test_indices_depend_only_on_the_position(seed, n, start, length, cut):
  """A stream read in two pieces (a resume at `cut`) equals the stream read at once."""
  positions = np.arange(start, start + length)
  cut = min(cut, length)
  whole = order.example_indices(seed, positions, n)
  pieces = np.concatenate(
    [
      order.example_indices(seed, positions[:cut], n),
      order.example_indices(seed, positions[cut:], n),
    ]
  )
  np.testing.assert_array_equal(whole, pieces)


@fast
@given(
  start=st.integers(0, 10**12),
  per_process=st.integers(1, 64),
  process_count=st.integers(1, 8),
)
def test_process_shards_partition_the_global_batch(start, per_process, process_count):
  batch_size = per_process * process_count
  shards = [
    order.process_positions(start, batch_size, p, process_count)
    for p in range(process_count)
  ]
  np.testing.assert_array_equal(
    np.concatenate(shards), np.arange(start, start + batch_size)
  )


@pytest.mark.parametrize(
  ('batch_size', 'process_index', 'process_count', 'match'),
  [
    (10, 0, 4, 'not divisible by the 4 processes'),
    (0, 0, 1, 'not divisible'),
    (8, 4, 4, r'not in \[0, 4\)'),
    (8, -1, 4, r'not in \[0, 4\)'),
    (8, 0, 0, r'not in \[0, 0\)'),
  ],
)
def test_bad_batch_splits_are_explained(batch_size, process_index, process_count, match):
  with pytest.raises(ValueError, match=match):
    order.process_positions(0, batch_size, process_index, process_count)


def test_negative_positions_and_empty_splits_are_rejected():
  with pytest.raises(ValueError, match='start at 0'):
    order.example_indices(0, np.array([-1, 0]), 10)
  with pytest.raises(ValueError, match='needs examples'):
    order.example_indices(0, np.array([0]), 0)


@fast
@given(
  seed=st.integers(-(2**63), 2**64 - 1),
  positions=st.lists(st.integers(0, 2**62), min_size=1, max_size=50),
  draws=st.integers(1, 50),
)
def test_position_uniform_is_per_position(seed, positions, draws):
  """Each row depends on (seed, position) only, not on the rest of the batch."""
  positions = np.array(positions)
  u = order.position_uniform(seed, positions, draws)
  assert u.shape == (len(positions), draws)
  assert u.min() >= 0 and u.max() < 1
  for i in range(0, len(positions), 7):
    np.testing.assert_array_equal(
      u[i], order.position_uniform(seed, positions[i : i + 1], draws)[0]
    )


def test_position_uniform_looks_uniform_and_seeded():
  u = order.position_uniform(3, np.arange(20_000), 4)
  assert abs(u.mean() - 0.5) < 0.01
  assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
  histogram = np.histogram(u[:, 2], bins=10, range=(0, 1))[0]
  assert histogram.min() > 1800
  v = order.position_uniform(4, np.arange(20_000), 4)
  assert abs(np.corrcoef(u[:, 0], v[:, 0])[0, 1]) < 0.03


def test_position_uniform_is_the_documented_hash():
  """SplitMix64 of (s · draws + d) xor SplitMix64(seed), top 53 bits, in Python ints."""
  mask = (1 << 64) - 1

  def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)

  seed, positions, draws = -5, [0, 1, 12_345, 2**40], 3
  key = splitmix64(seed & mask)
  expected = [
    [(splitmix64((s * draws + d) ^ key) >> 11) / 2**53 for d in range(draws)]
    for s in positions
  ]
  np.testing.assert_array_equal(
    order.position_uniform(seed, np.array(positions), draws), expected
  )
