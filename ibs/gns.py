"""The gradient noise scale, measured in the train step (McCandlish et al. 2018).

The paper's g = εN/(B(1 − m)) (ibs/noise_scale.py) is *computed* from the schedule. The
gradient noise scale of McCandlish, Kaplan, Amodei et al., "An Empirical Model of
Large-Batch Training" (2018), is *measured*: with G the true gradient and Σ the
per-example gradient covariance,

    B_simple = tr(Σ) / |G|²                                    (their eq. 2.9)

is the batch above which a larger batch barely reduces the loss per step more. A
gradient estimated from b examples has E|G_b|² = |G|² + tr(Σ)/b, so two batch sizes
b < B give unbiased estimates of both terms (their Appendix A.1):

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

A data-parallel step has both for free (docs/DESIGN.md decision 11): |G_b|² is the mean
over devices of each device's squared gradient norm before the reduction, |G_B|² the
squared norm of the reduced gradient. On one device the micro-batches of an accumulated
step play the devices' part; a step with one micro-batch on one device splits its batch
in two (ibs/step.py). Either estimate is noisy at one step, and B_simple is a ratio, so
each term gets its own exponential moving average over a horizon of H examples and the
ratio is taken of the averages, as AdaptDL does:

    β = exp(−E/H);  S ← β·S + (1 − β)·x;  W ← β·W + (1 − β)

with E the examples trained on since the last estimate was folded in (B when every update
measures). W is the bias correction (Adam's 1 − β^t, for a β that changes with B): S/W is
the average of the estimates seen so far, weighted by recency in examples.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import struct


def grad_sq_norm(small_sq: jnp.ndarray, big_sq: jnp.ndarray, b: float, big_b: float):
  """Unbiased |G|² from |G_b|² and |G_B|² (McCandlish et al. 2018, App. A.1)."""
  return (big_b * big_sq - b * small_sq) / (big_b - b)


def trace_cov(small_sq: jnp.ndarray, big_sq: jnp.ndarray, b: float, big_b: float):
  """Unbiased tr(Σ) from |G_b|² and |G_B|² (McCandlish et al. 2018, App. A.1)."""
  return (small_sq - big_sq) / (1.0 / b - 1.0 / big_b)


@struct.dataclass
class GNSState:
  """Moving averages of the two estimates and their common bias correction."""

  grad_sq_norm: jnp.ndarray  # Σ-weighted |G|² estimates, uncorrected
  trace_cov: jnp.ndarray  # the same for tr(Σ)
  weight: jnp.ndarray  # W: the weight the averages have accumulated
  pending_examples: jnp.ndarray  # E: examples since the last estimate folded in

  @classmethod
  def empty(cls) -> GNSState:
    # Separate buffers, not one shared: the train step donates the state.
    return cls(*(jnp.zeros((), jnp.float32) for _ in range(4)))


def decay(batch_size: int, horizon_examples: float) -> float:
  """β = exp(−B/H): a fixed horizon in examples, whatever the batch (a Python float)."""
  return math.exp(-batch_size / horizon_examples)


def update(
  state: GNSState,
  small_sq: jnp.ndarray,
  big_sq: jnp.ndarray,
  small_batch: float,
  big_batch: float,
  horizon_examples: float,
) -> GNSState:
  """One update of `big_batch` examples; its estimates folded in if they are finite.

  A NaN `small_sq` marks an update that did not measure (ibs/step.py): its examples
  only lengthen the gap E that the next estimate's β covers.
  """
  g2 = grad_sq_norm(small_sq, big_sq, small_batch, big_batch)
  s = trace_cov(small_sq, big_sq, small_batch, big_batch)
  finite = jnp.isfinite(g2) & jnp.isfinite(s)
  pending = state.pending_examples + jnp.float32(big_batch)
  beta = jnp.where(finite, jnp.exp(-pending / jnp.float32(horizon_examples)), 1.0)

  def ema(average, x):
    return beta * average + (1.0 - beta) * jnp.where(finite, x, 0.0)

  return GNSState(
    grad_sq_norm=ema(state.grad_sq_norm, g2),
    trace_cov=ema(state.trace_cov, s),
    weight=beta * state.weight + (1.0 - beta),
    pending_examples=jnp.where(finite, 0.0, pending),
  )


def estimates(state: GNSState) -> dict[str, float]:
  """Bias-corrected |G|², tr(Σ) and B_simple, as host floats (NaN before any update).

  The TensorBoard tags of `gns/grad_sq_norm`, `gns/trace_cov` and `gns/b_simple`.
  Where the unbiased |G|² is ≤ 0 (the noise tr(Σ)/B swamps the signal over the horizon:
  late in training, at a small batch) B_simple is not resolved and logged as NaN, no
  point, rather than an infinite or negative ratio; the log line says so and counts
  such logs (ibs/reporting.py).
  """
  weight = float(state.weight)
  if weight <= 0.0:
    nan = float('nan')
    return {'gns/grad_sq_norm': nan, 'gns/trace_cov': nan, 'gns/b_simple': nan}
  g2 = float(state.grad_sq_norm) / weight
  s = float(state.trace_cov) / weight
  return {
    'gns/grad_sq_norm': g2,
    'gns/trace_cov': s,
    'gns/b_simple': s / g2 if g2 > 0 else float('nan'),
  }


def b_simple(state: GNSState) -> float:
  """The bias-corrected B_simple = tr(Σ)/|G|² for a decision (NaN before any estimate).

  Unlike the logged value, an unresolved |G|² (≤ 0) gives inf here: the noise
  dominates, so every batch in reach is below B_simple (ibs/adaptive.py climbs on it).
  """
  values = estimates(state)
  g2 = values['gns/grad_sq_norm']
  if math.isfinite(g2) and not g2 > 0:
    return float('inf')
  return values['gns/b_simple']
