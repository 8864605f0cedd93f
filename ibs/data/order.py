"""Data order as a pure function of (seed, example position) (docs/DESIGN.md decision 5).

Training reads a single infinite stream of *positions* s = 0, 1, 2, … . Epoch e = s // N
is a seeded permutation of the N training examples and position s holds example
perm_e[s mod N]. Because of that:

* any position can be resumed in O(1), without replaying the stream;
* a global batch of size B at position s is positions [s, s + B), whatever the phase, so
  a phase boundary (B 128 → 640, say) neither drops nor repeats an example;
* process p of P reads the contiguous slice [s + pB/P, s + (p+1)B/P) of each batch.

Augmentation randomness is keyed by the position too (`position_uniform`), so it does not
depend on batch size, restarts or the number of hosts.
"""

import functools

import numpy as np

_UINT64 = 1 << 64


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """perm_e: the order of epoch `epoch`, from a generator seeded by (seed, epoch).

  Cached (read-only) because consecutive batches mostly fall in the same epoch, and an
  ImageNet-sized permutation is not free to draw.
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f'Seed {seed} and epoch {epoch} must be non-negative.')
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  permutation.setflags(write=False)
  return permutation


def example_indices(seed: int, positions: np.ndarray, num_examples: int) -> np.ndarray:
  """Example index held by each stream position: perm_{s // N}[s mod N]."""
  if num_examples <= 0:
    raise ValueError(f'A split needs examples; this one has {num_examples}.')
  positions = np.asarray(positions, np.int64)
  if not positions.size:
    return np.empty_like(positions)
  first = positions.min()
  if first < 0:
    raise ValueError(f'Stream positions start at 0; got {first}.')
  first_epoch = first // num_examples
  if positions.max() // num_examples == first_epoch:  # most batches: one gather
    return epoch_permutation(seed, int(first_epoch), num_examples)[
      positions - first_epoch * num_examples
    ]
  # A batch across an epoch boundary (or B > N): one gather per epoch it spans.
  epochs = positions // num_examples
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs):
    where = epochs == epoch
    indices[where] = epoch_permutation(seed, int(epoch), num_examples)[
      positions[where] % num_examples
    ]
  return indices


def process_positions(
  start: int, batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
  """The positions of the global batch [start, start + B) that process p reads."""
  check_batch_split(batch_size, process_index, process_count)
  per_process = batch_size // process_count
  first = start + process_index * per_process
  return np.arange(first, first + per_process, dtype=np.int64)


def check_batch_split(batch_size: int, process_index: int, process_count: int) -> None:
  """Raises a ValueError unless B splits into P equal contiguous slices and 0 ≤ p < P."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f'Process index {process_index} is not in [0, {process_count}): pass '
      'jax.process_index() and jax.process_count().'
    )
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
      f'Batch size {batch_size} is not divisible by the {process_count} processes; '
      'make every phase batch size (and config.eval_batch_size) a positive multiple '
      'of the process count.'
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a bijective avalanche hash of 64-bit integers."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def position_uniform(seed: int, positions: np.ndarray, draws: int) -> np.ndarray:
  """`draws` independent U[0, 1) numbers per position, a pure function of (seed, s).

  Counter-based (a hash of seed, position and draw index), so augmentation of position
  s is the same on any host, at any batch size and after any restart. Returns an array
  of shape (len(positions), draws).
  """
  with np.errstate(over='ignore'):
    key = _splitmix64(np.full(1, seed % _UINT64, np.uint64))
    positions = np.asarray(positions, np.int64).astype(np.uint64)[:, None]
    counters = positions * np.uint64(draws) + np.arange(draws, dtype=np.uint64)[None, :]
    bits = _splitmix64(counters ^ key)
  # The top 53 bits fill a double's mantissa exactly: values in [0, 1), never 1.
  return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)
