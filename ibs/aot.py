"""The loop's small programs (evaluation, the checkpoint checksum) compiled beside
training, so that no event compiles in the loop.

A `jax.jit` function compiles at its first call. For the programs that the loop's
events run (the evaluation step at the first evaluation, the state checksum at the first
checkpoint) that first call came in the middle of training, on the path of the run:
on the default run on 2 cores it cost 1.2 s at the first evaluation and 0.6 to 2.3 s at
the first checkpoint, while the later phases' steps compiled beside (docs/BENCHMARKS.md,
"No compile in the loop"). `Precompiled` starts that compile (and its tracing) in a
thread when the run is built, for the argument shapes the loop will pass; the first
event then finds it compiled. Arguments of any other shape or sharding (a probe's
branch state, a slice of the train split) run the jitted function itself, which
compiles for them as any jit does: the same function, so the same numbers.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax
import jax.numpy as jnp


class Precompiled:
  """`jitted` (a `jax.jit` function), with its program for `abstract_args` (arrays or
  `jax.ShapeDtypeStruct`s with their shardings) compiling in a background thread from
  now on. `misses` counts calls that ran `jitted` instead (tests)."""

  def __init__(self, jitted: Any, *abstract_args: Any):
    self._jitted = jitted
    self.misses = 0
    # Shapes, dtypes and shardings now, in the caller's thread: arrays passed here may
    # be donated to a train step before the thread lowers.
    abstract_args = abstract(abstract_args)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='ibs_compile_aot')
    self._program = pool.submit(lambda: jitted.lower(*abstract_args).compile())
    pool.shutdown(wait=False)  # the thread ends with its one task

  def __call__(self, *args: Any) -> Any:
    try:
      program = self._program.result()
    except Exception:  # compiled at this call instead, where its error is raised
      self.misses += 1
      return self._jitted(*args)
    try:
      return program(*args)
    except (TypeError, ValueError):  # other shapes, dtypes, tree (TypeError) or
      # shardings (ValueError): JAX checks them before anything runs
      self.misses += 1
      return self._jitted(*args)


def abstract(tree: Any, target: Any = None) -> Any:
  """Shapes and dtypes of `tree` (arrays, abstract values or scalars) on `target`, to
  lower for. `target` None keeps each array's own sharding."""

  def spec(x):
    x = x if hasattr(x, 'shape') else jnp.asarray(x)
    placed = target if target is not None else getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed)

  return jax.tree.map(spec, tree)
