"""ibs/aot.py: a jitted function's program compiled beside, the jit itself otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibs import aot


def test_precompiled_runs_its_program_for_its_shapes_and_the_jit_for_others():
  calls = []

  def affine(x, y):
    calls.append(x.shape)  # once per trace
    return 3.0 * x + y

  program = aot.Precompiled(jax.jit(affine), jnp.zeros(4), jnp.zeros(4))
  x, y = np.arange(4.0, dtype=np.float32), np.ones(4, np.float32)
  np.testing.assert_array_equal(program(jnp.asarray(x), jnp.asarray(y)), 3 * x + y)
  assert program.misses == 0
  assert calls == [(4,)]  # traced once, in the background thread, for its shapes

  wider = np.arange(6.0, dtype=np.float32)
  np.testing.assert_array_equal(program(wider, np.ones(6, np.float32)), 3 * wider + 1)
  assert program.misses == 1
  assert calls == [(4,), (6,)]


def test_precompiled_raises_its_compile_error_at_the_call():
  def bad(x):
    return x @ jnp.zeros((3, 2))  # (4,) @ (3, 2): no such product

  program = aot.Precompiled(jax.jit(bad), jnp.zeros(4))
  with pytest.raises(TypeError, match='dot_general'):
    program(jnp.zeros(4))
