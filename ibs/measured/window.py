"""A noise-scale estimate fit for decisions: window means of the step's moving averages.

The step measures |G|² and tr(Σ) (McCandlish et al. 2018, App. A.1) and keeps a moving
average of each over a horizon of H examples (ibs/gns.py). Read at one instant, their
ratio B_simple = tr(Σ)/|G|² is too noisy to decide on where the batch is small: at
B = 32 the two halves the step compares are 16 examples each, the |G|² estimate is the
difference of two squared norms each ~tr(Σ)/16 ≈ 20·|G|², and one estimate per 100
updates (config.gns.split_every) gives a handful per horizon (docs/REPRODUCTION.md, "The
adaptive schedule": the readings at decision points in one phase spanned a factor 2–4
between median and 90th percentile).

Each decision point therefore appends the bias-corrected averages (examples, tr(Σ), |G|²)
to a window kept in the decision record, and reads

    B_window = Σ_points tr(Σ) / Σ_points |G|²,

the ratio of the window's means over the points of the last `window_examples`
examples. The numerator and denominator are averaged before dividing, because a ratio
of a |G|² estimate that comes near 0 has a heavy tail, and their means do not. With
points every half epoch and H one epoch, a window of W epochs averages the estimates of
about W + 1 epochs of training. How small the spread of B_window is at a fixed point of
training is measured in docs/REPRODUCTION.md ("Schedules decided by measurement"),
with the measurement on every update (config.gns.split_every = 1).
"""

from __future__ import annotations

import math

Point = tuple[int, float, float]  # (examples seen, tr(Σ), |G|²)


def add(
  points: tuple[Point, ...],
  examples: int,
  trace_cov: float,
  grad_sq_norm: float,
  window_examples: int,
) -> tuple[Point, ...]:
  """`points` with this point's estimates (when finite), less those older than the window.

  A point is in the window when it is less than `window_examples` examples old.
  """
  kept = [p for p in points if p[0] > examples - window_examples]
  if math.isfinite(trace_cov) and math.isfinite(grad_sq_norm):
    kept.append((int(examples), float(trace_cov), float(grad_sq_norm)))
  return tuple(kept)


def b_simple(points: tuple[Point, ...]) -> float:
  """B_window = Σ tr(Σ) / Σ |G|²: NaN with no point, inf when Σ |G|² ≤ 0 (the noise
  dominates, as ibs.gns.estimates reads it)."""
  if not points:
    return math.nan
  trace_cov = sum(p[1] for p in points)
  grad_sq_norm = sum(p[2] for p in points)
  return trace_cov / grad_sq_norm if grad_sq_norm > 0 else math.inf


def to_record(points: tuple[Point, ...]) -> list[list[float]]:
  return [[e, t, g] for e, t, g in points]


def from_record(rows: list) -> tuple[Point, ...]:
  return tuple((int(e), float(t), float(g)) for e, t, g in rows)
