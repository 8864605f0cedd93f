r"""The critical-batch probe: branch short runs at several B from one run's checkpoints.

  python -m ibs.tools.probe --workdir=/tmp/ibs_default --points=50,75,100 \
      --batch_sizes=32,64,128,256,512,1024 --branch_examples=20480

Merrill et al. 2025 ("Critical Batch Size Revisited") measure the critical batch
directly instead of inferring it from the gradient noise scale. From the run's state
at a point in training, branch one short run per batch size B, each for the same L
examples, and compare the losses they reach:

    ε_B = ε · B / B_run          (--rule=linear: the paper's B ∝ ε, noise scale kept)
    ε_B = ε · √(B / B_run)       (--rule=sqrt)

with ε, m and B_run the run's for the update after the checkpoint (m unchanged). With
L_B the loss a branch reaches and B_0 the smallest B probed, the critical batch is

    B* = the largest B such that L_B' ≤ (1 + tolerance) · L_B0 for every B' ≤ B

(contiguous from B_0: a larger B that passes by chance after one that failed does not
count). When every B passes, B* is at least the largest B probed ('≥'). The estimate is
only as good as B_0 is small: when B* = B_0, probe smaller batches. The tolerance is
relative, so it means the same at any loss; its default, 5%, is about twice the noise
of L_B/L_B0 that this measurement leaves on the default run late in training (1–3% at
epoch 75, under 1% at 100; 6–9% at epochs 25–50, where no tolerance this small is safe
from noise: docs/PROBE.md). Below twice the noise, B* is decided by noise; the table
says so.

L_B, the loss at the end of a branch, is measured on a fixed slice of the training set
(its first --loss_examples examples by index; all of it when 0), in eval mode (BN
running statistics), and averaged over the last half of the branch:

    L_B = (1/K) Σ_j ℓ(θ after the update that reaches L/2 + j·L/(2K) examples),  j = 1…K

with ℓ the slice's mean cross-entropy and K = --loss_evals (K = 1: the end only). Why:
* A fixed slice, the same for every branch and every point, makes the comparison across
  B paired and free of minibatch sampling noise; the running train loss would mix the
  last batches' noise and train-mode (ghost-batch) BN statistics into it. That running
  loss over the same half is reported beside it (`train_loss`).
* The iterate itself is noisy. At a constant ε the loss of a single θ wanders around
  its trend: measured on the default run at epoch 50 (B 160, ε 0.1) the slice loss of
  one iterate varies by ±15% from one 1/16 of a branch to the next, and by ±6% at epoch
  75, more than the tolerance. Averaging K iterates over the last half shrinks that
  (by up to √K where they decorrelate), and leaves out the transient right after the
  branch point, where ε jumps from the run's to ε_B under an unchanged momentum buffer.
  `ratio_sem`, the standard error of L_B/L_B0 from the K paired ratios ℓ_B(j)/ℓ_B0(j)
  (`paired_ratio_sem`), says how much of a difference across B is noise; the table
  prints its median over B beside B*.
A mark L/2 + j·L/(2K) that is not a multiple of B is measured after the first update
past it, less than one batch later (exact when L/(2K) is a multiple of every B).

Each point branches from the nearest checkpoint the run kept (the run keeps its 3
newest: the default run's checkpoints at epochs 50, 75 and 100), named in the table;
points that share one are measured once. The source run is read, never written:
branches restore read-only and write only under --out (ibs/tools/branch.py). Every batch
shape is compiled once, before the first branch. The run's logged `gns/b_simple`
(McCandlish et al.'s noise scale, ibs/gns.py) at each checkpoint is reported beside B*,
where the run measured it: Merrill et al. argue that the noise scale alone can mislead,
so the two are meant to check each other.

Outputs under --out (default WORKDIR/probe): probe.csv (one row per point and B),
probe.json (the same, the critical batches, the arguments and timings), probe.png (L_B
against B, one curve per point). Argument errors are one line naming the flag, exit 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from ibs import clock, reporting, tf_setup  # pure Python, absl, etils: errors stay fast

RULES = ('linear', 'sqrt')


class UserError(Exception):
  """An argument the user can fix; the message is one line naming the flag."""


# ----------------------------------------------------------------------- the method


def scaled_learning_rate(
  learning_rate: float, batch_size: int, run_batch_size: int, rule: str
) -> float:
  """ε_B = ε·B/B_run (linear: g = εN/(B(1 − m)) unchanged) or ε·√(B/B_run) (sqrt)."""
  ratio = batch_size / run_batch_size
  if rule == 'linear':
    return learning_rate * ratio
  if rule == 'sqrt':
    return learning_rate * math.sqrt(ratio)
  raise ValueError(f'--rule={rule!r}: choose one of {list(RULES)}.')


@dataclasses.dataclass(frozen=True)
class CriticalBatch:
  """B*, and whether every B probed was within tolerance (then B* ≥ the largest)."""

  batch_size: int | None  # None: the reference (smallest B) itself failed
  at_least: bool

  def __str__(self) -> str:
    if self.batch_size is None:
      return 'n/a'
    return f'{"≥" if self.at_least else ""}{self.batch_size}'


def critical_batch(
  batch_sizes: Sequence[int], losses: Sequence[float], tolerance: float
) -> CriticalBatch:
  """The largest B before the first whose loss exceeds (1 + tolerance)·L at the
  smallest B.

  A diverged branch has loss inf and fails; a non-finite reference gives no estimate.
  """
  pairs = sorted(zip(batch_sizes, losses, strict=True))
  reference = pairs[0][1]
  if not math.isfinite(reference):
    return CriticalBatch(None, False)
  bound = (1.0 + tolerance) * reference
  best = pairs[0][0]
  for batch_size, loss in pairs[1:]:
    if not loss <= bound:  # NaN fails too
      return CriticalBatch(best, False)
    best = batch_size
  return CriticalBatch(best, True)


def measurement_updates(branch_examples: int, batch_size: int, evals: int) -> list[int]:
  """The update counts after which L_B is measured: the first update at or past each
  mark L/2 + j·L/(2K), j = 1…K, i.e. ⌈L·(K + j) / (2K·B)⌉."""
  k = evals
  return [
    -(-(branch_examples * (k + j)) // (2 * k * batch_size)) for j in range(1, k + 1)
  ]


def paired_ratio_sem(trace: Sequence[float], reference: Sequence[float]) -> float:
  """The standard error of L_B/L_B0 from the K paired measurements r_j = ℓ_B(j)/ℓ_B0(j).

  The measurements of every B fall at (nearly) the same example counts, on the same
  data, so r_j takes out what all branches share; its spread over j is the noise left
  in the comparison: sd(r)/√K (correlation over j ignored: a lower bound). NaN when
  there is nothing to pair (K = 1, or a diverged branch).
  """
  if len(trace) != len(reference) or len(trace) < 2:
    return math.nan
  ratios = [a / b for a, b in zip(trace, reference, strict=True)]
  mean = sum(ratios) / len(ratios)
  variance = sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1)
  return math.sqrt(variance / len(ratios))


def nearest_checkpoint(target_examples: int, checkpoints: dict[int, int]) -> int:
  """The step of the checkpoint {step: examples seen} nearest `target_examples`; of two
  equally near, the earlier."""
  return min(checkpoints, key=lambda s: (abs(checkpoints[s] - target_examples), s))


def logged_b_simple(scalars: dict, step: int) -> tuple[float, int] | None:
  """(B_simple, the step it was logged at): the run's last log at or before `step`.

  None where the run never logged it (config.gns.enabled=False) or not yet.
  """
  if 'gns/b_simple' not in scalars:
    return None
  steps, values = scalars['gns/b_simple']
  before = [i for i, s in enumerate(steps) if s <= step]
  if not before:
    return None
  return float(values[before[-1]]), int(steps[before[-1]])


# ----------------------------------------------------------------------- arguments


@dataclasses.dataclass(frozen=True)
class Arguments:
  workdir: str
  points: tuple[float, ...]
  batch_sizes: tuple[int, ...]  # sorted
  branch_examples: int
  rule: str
  tolerance: float
  evaluate: bool
  loss_examples: int
  loss_evals: int
  out: str


def _numbers(values: Sequence[str] | None, flag: str, kind: type) -> list:
  if not values:
    raise UserError(f'--{flag} is empty; give a comma-separated list.')
  out = []
  for text in values:
    try:
      value = kind(text)
    except ValueError:
      raise UserError(
        f'--{flag}: {text!r} is not a{"n integer" if kind is int else " number"}.'
      ) from None
    out.append(value)
  return out


def parse_arguments(
  *,
  workdir: str | None,
  points: Sequence[str] | None,
  batch_sizes: Sequence[str] | None,
  branch_examples: int | None,
  rule: str = 'linear',
  tolerance: float = 0.05,
  evaluate: bool = False,
  loss_examples: int = 0,
  loss_evals: int = 8,
  out: str | None = None,
) -> Arguments:
  """The flags, checked against each other and the file system (no JAX, no config)."""
  if not workdir:
    raise UserError('--workdir is required: the ibs workdir to probe.')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is not a directory.')
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise UserError(f'--workdir={workdir} has no config.json: not an ibs workdir.')
  checkpoints = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(checkpoints):
    raise UserError(
      f'--workdir={workdir} has no checkpoints/ yet; nothing to branch from.'
    )
  parsed_points = _numbers(points, 'points', float)
  for p in parsed_points:
    if not (math.isfinite(p) and p >= 0):
      raise UserError(f'--points: {p:g} must be an epoch >= 0.')
  sizes = _numbers(batch_sizes, 'batch_sizes', int)
  for b in sizes:
    if b < 1:
      raise UserError(f'--batch_sizes: {b} must be a positive integer.')
  if len(set(sizes)) != len(sizes):
    twice = sorted({b for b in sizes if sizes.count(b) > 1})
    raise UserError(f'--batch_sizes lists {", ".join(map(str, twice))} more than once.')
  if len(sizes) < 2:
    raise UserError('--batch_sizes needs at least two batch sizes to compare.')
  if branch_examples is None or branch_examples < 1:
    raise UserError(f'--branch_examples={branch_examples} must be a positive integer.')
  unit = math.lcm(*sizes)
  if branch_examples % unit:
    below = branch_examples // unit * unit
    suggestion = f'{below} or {below + unit}' if below else f'{unit}'
    raise UserError(
      f'--branch_examples={branch_examples} is not a multiple of every batch size (of '
      f'{unit}); every B must train on the same examples: use {suggestion}.'
    )
  if rule not in RULES:
    raise UserError(f'--rule={rule!r}: choose one of {", ".join(RULES)}.')
  if not (math.isfinite(tolerance) and tolerance >= 0):
    raise UserError(f'--tolerance={tolerance} must be a number >= 0 (0.05: 5%).')
  if loss_examples < 0:
    raise UserError(f'--loss_examples={loss_examples} must be >= 0 (0: all of them).')
  half = branch_examples // (2 * max(sizes))  # updates of the largest B in the last half
  if loss_evals < 1 or (loss_evals > 1 and loss_evals > half):
    raise UserError(
      f'--loss_evals={loss_evals} must be between 1 and {max(1, half)}, the updates of '
      f'B = {max(sizes)} in the last half of the branch (or lengthen --branch_examples).'
    )
  out = os.path.abspath(os.path.expanduser(out or os.path.join(workdir, 'probe')))
  if os.path.commonpath([out, checkpoints]) == checkpoints:
    raise UserError(f"--out={out} is inside the run's checkpoints/; choose another.")
  return Arguments(
    workdir,
    tuple(parsed_points),
    tuple(sorted(sizes)),
    branch_examples,
    rule,
    tolerance,
    evaluate,
    loss_examples,
    loss_evals,
    out,
  )


def check_against_run(
  args: Arguments, num_epochs: float, num_train: int, ghost_batch_size: int, devices: int
) -> None:
  """The arguments against the run's config: points inside training, batches it can
  split (devices × ghost batch), a loss slice no larger than the training set."""
  for p in args.points:
    if p > num_epochs:
      raise UserError(
        f'--points: {p:g} is past the end of training ({num_epochs:g} epochs).'
      )
  unit = devices * ghost_batch_size
  for b in args.batch_sizes:
    if b % unit:
      raise UserError(
        f'--batch_sizes: {b} is not a multiple of devices × ghost batch = {devices} × '
        f'{ghost_batch_size} = {unit}.'
      )
  if args.loss_examples > num_train:
    raise UserError(
      f'--loss_examples={args.loss_examples} exceeds the {num_train} training examples.'
    )


# ----------------------------------------------------------------------- the probe


def probe(args: Arguments, log=print, prober=None) -> dict[str, Any]:
  """Runs every branch; returns the results (what probe.json holds).

  `prober`, a branch.Prober of the run's config whose compiled steps cover
  --batch_sizes, is reused instead of compiling again (several probes of one run, in a
  notebook or the tests).
  """
  import jax  # here: the argument checks above run without JAX

  from ibs.data import sources
  from ibs.durability import checkpoint
  from ibs.tools import branch, curves

  wall_start = time.perf_counter()
  tf_setup.import_tensorflow()  # TFDS may use it: off the accelerators JAX needs
  config = branch.load_run_config(args.workdir)
  n = _num_train(config)
  check_against_run(
    args,
    float(config.schedule.num_epochs),
    n,
    config.ghost_batch_size,
    jax.device_count(),
  )
  manager = branch.open_checkpoints(args.workdir)
  try:
    positions = branch.read_positions(manager, checkpoint.config_fingerprint(config))
    if not positions:
      raise UserError(f'--workdir={args.workdir} has no readable checkpoint yet.')
    chosen = _choose_checkpoints(args.points, positions, n, log)
    if prober is None:
      prober = branch.Prober.create(config, list(args.batch_sizes))
    elif not set(args.batch_sizes) <= set(prober.steps):
      raise ValueError(f'The prober was compiled for B = {sorted(prober.steps)}.')
    log(
      f'compiled {len(prober.steps)} batch size(s) in {prober.compile_s:.1f} s '
      f'for B = {", ".join(map(str, args.batch_sizes))}'
    )
    slice_ = sources.Prefix(prober.train_source, args.loss_examples or n)
    scalars = curves.read_scalars(args.workdir)
    results = []
    for step, points in chosen.items():
      results.append(
        _probe_checkpoint(
          args, prober, manager, positions[step], points, slice_, scalars, log
        )
      )
  finally:
    manager.close()
  return {
    'workdir': args.workdir,
    'arguments': {k: v for k, v in dataclasses.asdict(args).items() if k != 'workdir'},
    'loss': (
      f'mean cross-entropy over the first {slice_.size} training examples, eval mode, '
      f'averaged at {args.loss_evals} points of the last half of the branch'
    ),
    'points': results,
    'compile_s': prober.compile_s,
    'wall_clock_s': time.perf_counter() - wall_start,
  }


def _num_train(config) -> int:
  from ibs.data import catalog

  return catalog.dataset_spec(config).num_train_examples


def _choose_checkpoints(points, positions, n, log) -> dict[int, list[float]]:
  """{checkpoint step: the points it stands for}, in step order, saying which is used."""
  examples = {s: p.examples_seen for s, p in positions.items()}
  chosen: dict[int, list[float]] = {}
  for point in points:
    step = nearest_checkpoint(clock.examples_at_epoch(point, n), examples)
    chosen.setdefault(step, []).append(point)
  for step, pts in sorted(chosen.items()):
    epoch = examples[step] / n
    far = max(abs(p - epoch) for p in pts)
    log(
      f'point{"s" if len(pts) > 1 else ""} {", ".join(f"{p:g}" for p in pts)}: the '
      f'checkpoint of step {step} (epoch {epoch:g})'
      + (f', {far:g} epochs away' if far > 0 else '')
    )
  return dict(sorted(chosen.items()))


def _probe_checkpoint(args, prober, manager, position, points, slice_, scalars, log):
  """Every B from one checkpoint: a row per branch and the critical batch."""
  from ibs.tools import branch

  run = branch.run_point(prober.schedule, prober.config, position)
  run_state = prober.restore(manager, position.step, position)
  start = prober.mean_metrics(run_state, slice_)
  lr = run.hyperparams['learning_rate']
  log(
    f'epoch {run.epoch:g} (step {run.step}): run B = {run.batch_size}, ε = {lr:g}; '
    f'slice loss {start["loss"]:.5f} at the branch point'
  )
  rows = [
    _branch_row(args, prober, run, run_state, b, slice_, log) for b in args.batch_sizes
  ]
  critical = critical_batch(
    [r['batch_size'] for r in rows], [r['loss'] for r in rows], args.tolerance
  )
  reference = rows[0]
  for row in rows:
    usable = math.isfinite(reference['loss']) and reference['loss'] > 0
    row['loss_ratio'] = row['loss'] / reference['loss'] if usable else math.nan
    row['ratio_sem'] = paired_ratio_sem(row['loss_trace'], reference['loss_trace'])
  noise = [r['ratio_sem'] for r in rows[1:] if math.isfinite(r['ratio_sem'])]
  logged = logged_b_simple(scalars, position.step)
  return {
    'points': points,
    'checkpoint_step': position.step,
    'checkpoint_epoch': run.epoch,
    'examples_seen': run.examples_seen,
    'run_batch_size': run.batch_size,
    'run_learning_rate': lr,
    'run_momentum': run.hyperparams.get('momentum', 0.0),
    'start_loss': start['loss'],
    'critical_batch_size': critical.batch_size,
    'critical_at_least': critical.at_least,
    'critical': str(critical),
    # The median over B of the paired standard error of L_B/L_B0: the noise to
    # compare the tolerance with.
    'noise': float(sorted(noise)[len(noise) // 2]) if noise else math.nan,
    'b_simple': None if logged is None else logged[0],
    'b_simple_epoch': None
    if logged is None
    else _epoch_at(scalars, logged[1], prober.schedule.num_train_examples),
    'branches': rows,
  }


def _branch_row(args, prober, run, run_state, batch_size, slice_, log) -> dict:
  """One branch at `batch_size` from `run_state`, measured; its row of the table."""
  lr = scaled_learning_rate(
    run.hyperparams['learning_rate'], batch_size, run.batch_size, args.rule
  )
  updates = args.branch_examples // batch_size
  result = prober.branch(
    run_state,
    run.examples_seen,
    batch_size,
    {**run.hyperparams, 'learning_rate': lr},
    args.branch_examples,
    measure_after=measurement_updates(args.branch_examples, batch_size, args.loss_evals),
    measure=lambda state: prober.mean_metrics(state, slice_)['loss'],
    window_start=updates // 2,
  )
  trace = result.measured
  row = {
    'batch_size': batch_size,
    'learning_rate': lr,
    'updates': updates,
    'diverged': result.halted_at_step is not None,
    'loss': math.inf,
    'loss_sem': math.nan,
    'loss_trace': trace,
    'train_loss': result.train_loss,
    'seconds': result.seconds,
  }
  if not row['diverged']:
    row['loss'] = sum(trace) / len(trace)
    if len(trace) > 1:
      mean = row['loss']
      variance = sum((x - mean) ** 2 for x in trace) / (len(trace) - 1)
      row['loss_sem'] = math.sqrt(variance / len(trace))
    if args.evaluate:
      test = prober.mean_metrics(result.state, prober.test_source)
      row.update(test_loss=test['loss'], test_accuracy=test['accuracy'])
  log(
    f'  B = {batch_size:>6}  ε = {lr:<10.4g} L_B {row["loss"]:.5f}'
    + (' (diverged)' if row['diverged'] else '')
    + (f'  test accuracy {row["test_accuracy"]:.4f}' if 'test_accuracy' in row else '')
    + f'  ({result.seconds:.1f} s)'
  )
  return row


def _epoch_at(scalars, step, n) -> float | None:
  """The logged epoch of `step`."""
  steps, values = scalars.get('epoch', ((), ()))
  for s, v in zip(steps, values, strict=True):
    if s == step:
      return float(v)
  return None


# ----------------------------------------------------------------------- outputs


def format_table(results: dict[str, Any]) -> str:
  """The branches and the critical batch of every point, as text."""
  args = results['arguments']
  evaluate = args['evaluate']
  lines = [
    f'probe of {results["workdir"]}: {args["branch_examples"]:,} examples per branch, '
    f'ε by the {args["rule"]} rule, tolerance {args["tolerance"]:g}',
    f'L_B = {results["loss"]}',
    '',
    f'{"epoch":>7} {"step":>7} {"B_run":>6} {"B":>6} {"ε_B":>10} {"updates":>8} '
    f'{"L_B":>9} {"L_B/L_B0":>9} {"± sem":>7} {"train":>8}'
    + (f' {"test acc":>9}' if evaluate else ''),
  ]
  for point in results['points']:
    for row in point['branches']:
      lines.append(
        f'{point["checkpoint_epoch"]:>7g} {point["checkpoint_step"]:>7} '
        f'{point["run_batch_size"]:>6} {row["batch_size"]:>6} '
        f'{row["learning_rate"]:>10.4g} {row["updates"]:>8} {row["loss"]:>9.5f} '
        f'{row["loss_ratio"]:>9.4f} {row["ratio_sem"]:>7.4f} {row["train_loss"]:>8.5f}'
        + (f' {row.get("test_accuracy", math.nan):>9.4f}' if evaluate else '')
        + ('  diverged' if row['diverged'] else '')
      )
  lines += [
    '',
    f'critical batch B* (largest B with L_B ≤ {1 + args["tolerance"]:g}·L_B0, '
    'contiguous from the smallest B); noise: the median paired sem of L_B/L_B0:',
  ]
  for point in results['points']:
    b_simple = point['b_simple']
    measured = (
      'not logged'
      if b_simple is None
      else 'not measured (NaN)'
      if math.isnan(b_simple)
      else f'{b_simple:,.0f} (logged at epoch {point["b_simple_epoch"]:g})'
    )
    pts = ', '.join(f'{p:g}' for p in point['points'])
    lines.append(
      f'  point{"s" if len(point["points"]) > 1 else ""} {pts} → checkpoint at epoch '
      f'{point["checkpoint_epoch"]:g}: B* = {point["critical"]:>6}, noise '
      f'{point["noise"]:.1%}; run B = {point["run_batch_size"]}, logged '
      f'B_simple = {measured}'
    )
  if any(p['noise'] * 2 > args['tolerance'] for p in results['points']):
    lines.append(
      '  (where 2 × noise exceeds the tolerance, B* is decided by noise as much as by '
      'B: lengthen --branch_examples, raise --loss_evals or --tolerance)'
    )
  lines.append(
    f'\n{results["wall_clock_s"]:.1f} s in all (compilation {results["compile_s"]:.1f} s)'
  )
  return '\n'.join(lines)


CSV_FIELDS = (
  'checkpoint_epoch',
  'checkpoint_step',
  'points',
  'run_batch_size',
  'run_learning_rate',
  'batch_size',
  'learning_rate',
  'updates',
  'loss',
  'loss_sem',
  'loss_ratio',
  'ratio_sem',
  'train_loss',
  'test_loss',
  'test_accuracy',
  'diverged',
  'critical',
  'noise',
  'b_simple',
  'seconds',
)


def write_outputs(results: dict[str, Any], out: str) -> dict[str, str]:
  """probe.csv, probe.json and probe.png under `out`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = {k: os.path.join(out, f'probe.{k}') for k in ('csv', 'json', 'png')}
  with open(paths['csv'], 'w', newline='') as f:
    writer = csv.DictWriter(f, CSV_FIELDS, extrasaction='ignore')
    writer.writeheader()
    for point in results['points']:
      shared = {k: point[k] for k in CSV_FIELDS if k in point}
      shared['points'] = ' '.join(f'{p:g}' for p in point['points'])
      for row in point['branches']:
        writer.writerow({**shared, **row})
  with open(paths['json'], 'w') as f:
    json.dump(results, f, indent=2, default=_jsonable)
    f.write('\n')
  plot(results).savefig(paths['png'], dpi=150)
  return paths


def _jsonable(value):
  return repr(value)


def plot(results: dict[str, Any]):
  """L_B against B (log-log), one curve per point, B* starred; and L_B/L_B0 with the
  tolerance line, where B* is read off; test accuracy too when evaluated."""
  from matplotlib.figure import Figure

  evaluate = results['arguments']['evaluate']
  tolerance = results['arguments']['tolerance']
  panels = 3 if evaluate else 2
  fig = Figure(figsize=(4.6 * panels, 3.8), layout='constrained')
  axes = fig.subplots(1, panels)
  sizes = list(results['arguments']['batch_sizes'])
  lowest = 1.0
  for point in results['points']:
    rows = point['branches']
    x = [r['batch_size'] for r in rows]
    b_simple = point['b_simple']
    measured = b_simple is not None and math.isfinite(b_simple) and b_simple > 0
    label = f'epoch {point["checkpoint_epoch"]:g}: run B {point["run_batch_size"]}' + (
      f', B_simple {b_simple:,.0f}' if measured else ''
    )
    (line,) = axes[0].plot(x, [r['loss'] for r in rows], 'o-', label=label)
    color = line.get_color()
    # The ratio panel is where B* is read off: it zooms on [.., 1 + 4·tolerance] and
    # marks a ratio beyond it with ▲ at the top.
    top = 1 + 4 * max(tolerance, 0.01)
    ratios = [r['loss_ratio'] for r in rows]
    inside = [r <= top for r in ratios]  # False for inf and NaN too
    axes[1].errorbar(
      x,
      [r if ok else top for r, ok in zip(ratios, inside, strict=True)],
      yerr=[
        r['ratio_sem'] if ok and math.isfinite(r['ratio_sem']) else 0.0
        for r, ok in zip(rows, inside, strict=True)
      ],
      fmt='o-',
      capsize=2,
      color=color,
    )
    beyond = [b for b, ok in zip(x, inside, strict=True) if not ok]
    axes[1].plot(beyond, [top] * len(beyond), '^', color=color, markersize=9)
    lowest = min([lowest, *(r for r in ratios if math.isfinite(r))])
    if point['critical_batch_size'] is not None:
      at = x.index(point['critical_batch_size'])
      axes[0].plot(x[at], rows[at]['loss'], '*', color=color, markersize=14, zorder=3)
      axes[1].plot(x[at], ratios[at], '*', color=color, markersize=14, zorder=3)
    if measured and sizes[0] <= b_simple <= sizes[-1]:  # else in the legend only
      for ax in axes[:2]:
        ax.axvline(b_simple, color=color, linestyle=':', linewidth=1)
    if evaluate:
      axes[2].plot(x, [r.get('test_accuracy', math.nan) for r in rows], 'o-', color=color)
  axes[1].axhline(1 + tolerance, color='gray', linestyle='--', linewidth=1)
  axes[1].set_ylim(min(lowest, 1 - tolerance) - 0.02, 1 + 4 * max(tolerance, 0.01) + 0.02)
  titles = (
    'loss at the end of the branch',
    f'L_B/L_B0 ± paired sem; dashed 1 + {tolerance:g}; ▲ off scale',
    'test accuracy',
  )
  ylabels = ('L_B (training slice, eval mode)', 'L_B / L_B0', 'test accuracy')
  for ax, title, ylabel in zip(axes, titles, ylabels, strict=False):
    ax.set_xscale('log', base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel('batch size B of the branch')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize='medium')
    ax.grid(alpha=0.3)
  from ibs.tools import curves  # its log-axis labels: 0.2, not 2×10⁻¹

  axes[0].set_yscale('log')  # losses span decades where a large B diverges
  axes[0].yaxis.set_major_formatter(curves.plain_log_formatter())
  axes[0].yaxis.set_minor_formatter(curves.plain_log_formatter(minor_thresholds=(2, 0.5)))
  axes[0].legend(fontsize='small')
  args = results['arguments']
  fig.suptitle(
    f'critical-batch probe: {args["branch_examples"]:,} examples per branch, '
    f'{args["rule"]} ε rule (★ B*, dotted: logged B_simple)',
    fontsize='medium',
  )
  return fig


# ----------------------------------------------------------------------- the CLI


def _define_flags() -> None:
  """The command line's flags; defined only when run as a program (ibs.main defines its
  own --workdir, and tests import both)."""
  flags.DEFINE_string('workdir', None, 'The ibs workdir to probe (finished or running).')
  flags.DEFINE_list('points', None, 'Points in training, in epochs: 25,50,75.')
  flags.DEFINE_list('batch_sizes', '32,64,128,256,512,1024', 'Batch sizes to branch at.')
  flags.DEFINE_integer(
    'branch_examples', None, 'Examples each branch trains on; a multiple of every B.'
  )
  flags.DEFINE_enum(
    'rule', 'linear', list(RULES), 'ε_B = ε·B/B_run (linear) or ε·√(B/B_run) (sqrt).'
  )
  flags.DEFINE_float(
    'tolerance', 0.05, 'B is within the critical batch while L_B ≤ (1 + this)·L_B0.'
  )
  flags.DEFINE_bool('eval', False, 'Also the test loss and accuracy of each branch.')
  flags.DEFINE_integer(
    'loss_examples',
    0,
    'L_B is measured on the first this-many training examples (0: all).',
  )
  flags.DEFINE_integer(
    'loss_evals', 8, 'L_B averages the slice loss at this many points of the last half.'
  )
  flags.DEFINE_string('out', None, 'Output directory (default WORKDIR/probe).')
  flags.mark_flags_as_required(['workdir', 'points', 'branch_examples'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  args = parse_arguments(
    workdir=values.workdir,
    points=values.points,
    batch_sizes=values.batch_sizes,
    branch_examples=values.branch_examples,
    rule=values.rule,
    tolerance=values.tolerance,
    evaluate=values.eval,
    loss_examples=values.loss_examples,
    loss_evals=values.loss_evals,
    out=values.out,
  )
  results = probe(args, log=lambda line: print(line, flush=True))
  paths = write_outputs(results, args.out)
  print('\n' + format_table(results), flush=True)
  print(f'wrote {paths["csv"]}, {paths["json"]}, {paths["png"]}', flush=True)


def _is_user_error(e: BaseException) -> bool:
  if isinstance(e, UserError):
    return True
  from ibs import config_checks
  from ibs.data import prepared
  from ibs.tools import branch

  return isinstance(
    e, branch.BranchError | config_checks.ConfigError | prepared.DatasetNotPreparedError
  )


if __name__ == '__main__':
  _define_flags()
  reporting.run_command(main, _is_user_error)
