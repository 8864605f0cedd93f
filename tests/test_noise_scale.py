"""The noise scale g and the calculator CLI, against the paper's numbers.

§5.1/§5.2 (docs/PAPER.md): N = 50,000, ε 0.1, m 0.9, B 128 start at
g ≈ εN/(B(1 − m)) = 390.625; the schedules then need 78,125 (decaying LR), 34,375
(hybrid, B_max 640) and 28,875 (increasing batch) parameter updates.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibs import calculator, clock, noise_scale, schedules
from ibs.schedules import Phase, Schedule, StepDecay

N = 50_000
RECIPE = StepDecay(0.1, 128, 0.9, (60.0, 120.0, 160.0), (5.0, 5.0, 5.0), 200.0)

# A config file as a user would write it: the §5.1 recipe on CIFAR-10, the schedule kind
# chosen by the `:arg` of --config=FILE.py:ARG.
CONFIG_FILE = textwrap.dedent(
  """
  import ml_collections


  def get_config(arg='increasing_batch'):
    # A whole training config (the calculator runs training's checks), with the
    # §5.1 recipe written out here: the expected numbers below follow from it.
    config = ml_collections.ConfigDict(dict(
        dataset='cifar10', data_dir=None, model='wide_resnet', optimizer='momentum',
        model_kwargs=ml_collections.ConfigDict(dict(depth=10, widen_factor=1)),
        ghost_batch_size=128, half_precision=False, max_micro_batch_size=1024,
        weight_decay=5e-4, weight_decay_mask='all', decoupled_weight_decay=False,
        eval_every_epochs=1.0, checkpoint_every_epochs=1.0, log_every_epochs=1.0,
        seed=0, data_seed=0, eval_batch_size=1000, stop_after_steps=0,
        steps_per_dispatch=1, nonfinite='stop', nonfinite_max_skipped=0.5,
        gns=ml_collections.ConfigDict(dict(
            enabled=True, horizon_examples=50000.0, split_every=1))))
    config.schedule = ml_collections.ConfigDict(dict(
        kind=arg, num_epochs=200.0, learning_rate=0.1, batch_size=128, momentum=0.9,
        milestones=(60.0, 120.0, 160.0), decay_factor=5.0,
        max_batch_size=640 if arg == 'hybrid' else 0, warmup_epochs=0.0))
    return config
  """
)


def _config(kind='increasing_batch', **fields):
  namespace = {}
  exec(CONFIG_FILE, namespace)
  config = namespace['get_config'](kind)
  for key, value in fields.items():
    config.schedule[key] = value
  return config


def test_noise_scale_formulas():
  # Exact: 0.1 · (50000/128 − 1) / 0.1 = 389.625; approximate: 0.1 · 50000 / 12.8.
  assert noise_scale.noise_scale(0.1, N, 128, 0.9) == pytest.approx(389.625)
  assert noise_scale.approximate_noise_scale(0.1, N, 128, 0.9) == pytest.approx(390.625)
  # §5.2: the increased-LR (ε 0.5, B 640) and increased-momentum (ε 0.5, m 0.98, B 3200)
  # runs start at the same approximate g; plain SGD with ε 1.0 too.
  for lr, batch, momentum in ((0.5, 640, 0.9), (0.5, 3200, 0.98), (1.0, 128, 0.0)):
    g = noise_scale.approximate_noise_scale(lr, N, batch, momentum)
    assert g == pytest.approx(390.625)
  # The −1 matters when B is not ≪ N: at B = N there is no noise at all.
  assert noise_scale.noise_scale(0.1, N, N, 0.9) == 0.0


def test_phase_table_for_the_increasing_batch_schedule():
  schedule = schedules.from_step_decay(RECIPE, 'increasing_batch', N)
  rows = noise_scale.phase_table(schedule)
  assert [(r.start_epoch, r.end_epoch) for r in rows] == [
    (0, 60),
    (60, 120),
    (120, 160),
    (160, 200),
  ]
  assert [r.batch_size for r in rows] == [128, 640, 3200, 16000]
  assert [r.approximate_noise_scale for r in rows] == pytest.approx(
    [390.625, 78.125, 15.625, 3.125]
  )
  # Exact g = 0.1 · (50000/B − 1) / 0.1.
  assert [r.noise_scale for r in rows] == pytest.approx([389.625, 77.125, 14.625, 2.125])
  assert [r.updates for r in rows] == [23_437.5, 4_687.5, 625.0, 125.0]
  assert [r.cumulative_updates for r in rows] == [23_437.5, 28_125.0, 28_750.0, 28_875.0]
  assert [r.steps for r in rows] == [23_438, 4_688, 625, 125]


@pytest.mark.parametrize(
  ('kind', 'total'),
  [('decaying_lr', '78,125.0'), ('hybrid', '34,375.0'), ('increasing_batch', '28,875.0')],
)
def test_table_totals_match_the_paper(kind, total):
  schedule = schedules.from_config(_config(kind), N)
  table = noise_scale.format_table(schedule, title='t')
  assert f'total: {total} parameter updates over 200 epochs of N=50,000' in table
  assert '390.6' in table  # initial approximate g, every schedule


def test_noise_scale_at_any_step_is_traceable():
  schedule = Schedule(
    (Phase(0.0, 4, 0.05, 0.9), Phase(1.0, 8, 0.05, 0.5), Phase(2.5, 16, 0.01, 0.0)),
    num_epochs=4.0,
    num_train_examples=40,
    warmup_epochs=1.5,
  )
  exact = jax.jit(jax.vmap(noise_scale.noise_scale_schedule(schedule)))
  approximate = jax.jit(jax.vmap(noise_scale.noise_scale_schedule(schedule, exact=False)))
  steps = jnp.arange(clock.num_steps(schedule), dtype=jnp.int32)
  # By hand: step 0 is in warm-up (ε = 0.05 · 4/60), step 12 is past it in phase 1, step
  # 20 in phase 2 (no momentum).
  expected_exact = {
    0: 0.05 * 4 / 60 * (40 / 4 - 1) / 0.1,
    12: 0.05 * (40 / 8 - 1) / 0.5,
    20: 0.01 * (40 / 16 - 1),
  }
  expected_approximate = {
    0: 0.05 * 4 / 60 * 40 / 4 / 0.1,
    12: 0.05 * 40 / 8 / 0.5,
    20: 0.01 * 40 / 16,
  }
  for step, value in expected_exact.items():
    assert float(exact(steps)[step]) == pytest.approx(value, rel=1e-6)
  for step, value in expected_approximate.items():
    assert float(approximate(steps)[step]) == pytest.approx(value, rel=1e-6)


def test_baseline_is_the_original_decaying_lr_schedule():
  # §5.2's increased-momentum run, written with the scaling rules: its baseline is the
  # original ε 0.1, m 0.9, B 128 step decay, 78,125 updates.
  config = _config(
    'hybrid',
    max_batch_size=5120,
    scale_batch_with_learning_rate=5.0,
    scale_batch_with_momentum=0.98,
  )
  baseline = noise_scale.baseline_schedule(config, N)
  assert baseline == schedules.from_step_decay(RECIPE, 'decaying_lr', N)
  schedule = schedules.from_config(config, N)
  comparison = noise_scale.format_comparison(schedule, baseline)
  # 78,125 − 2,304.6875 = 75,820.3; 78,125 / 2,304.6875 = 33.90.
  assert comparison == (
    'parameter updates: 2,304.7 vs 78,125.0 with decaying LR; '
    '75,820.3 saved, 33.90× fewer'
  )


def test_report_writes_the_figure(tmp_path):
  path = tmp_path / 'fig1.png'
  text = calculator.report(_config('hybrid'), baseline=True, plot=str(path))
  assert text.startswith('hybrid schedule on cifar10')
  assert 'baseline: decaying learning rate' in text
  assert '43,750.0 saved, 2.27× fewer' in text  # 78,125 − 34,375; 78,125 / 34,375
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_curves_follow_the_phases_and_warmup():
  schedule = schedules.from_step_decay(RECIPE, 'hybrid', N, max_batch_size=640)
  schedule = Schedule(schedule.phases, 200.0, N, warmup_epochs=5.0)
  epochs, curves = noise_scale._curves(schedule)
  lr, batch = curves['learning rate ε'], curves['batch size B']
  at = {e: int(np.argmin(np.abs(epochs - e))) for e in (2.5, 30, 90, 130, 190)}
  assert lr[at[2.5]] == pytest.approx(0.05)  # halfway through the warm-up
  assert [lr[at[e]] for e in (30, 90, 130, 190)] == pytest.approx([0.1, 0.1, 0.02, 0.004])
  assert [batch[at[e]] for e in (30, 90, 130, 190)] == [128, 640, 640, 640]


# Runs the CLI as `python -m ibs.calculator` would, then reports whether TensorFlow was
# imported on the way.
CLI_WRAPPER = """
import json, runpy, sys
sys.argv = ['ibs.calculator', *sys.argv[1:]]
code = 0
try:
  runpy.run_module('ibs.calculator', run_name='__main__', alter_sys=True)
except SystemExit as e:  # absl's app.run always exits; None means success.
  code = e.code or 0
print(json.dumps({
  'exit': code,
  'tensorflow': sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'),
}))
"""


def _run_cli(*args):
  result = subprocess.run(
    [sys.executable, '-c', CLI_WRAPPER, *args],
    capture_output=True,
    text=True,
    timeout=120,
  )
  *output, status = result.stdout.strip().splitlines()
  return '\n'.join(output), json.loads(status), result.stderr


def test_cli_prints_the_table_and_never_imports_tensorflow(tmp_path):
  config_file = tmp_path / 'cifar10_recipe.py'
  config_file.write_text(CONFIG_FILE)
  plot = tmp_path / 'fig1.png'
  output, status, stderr = _run_cli(
    f'--config={config_file}:increasing_batch', '--baseline', f'--plot={plot}'
  )
  assert status == {'exit': 0, 'tensorflow': []}, stderr
  assert output.startswith('increasing_batch schedule on cifar10')
  for row in (
    '    0        0–60       0.1      0.9     128    389.6    390.6   23,437.5'
    '   23,437.5   23,438',
    '    3     160–200       0.1      0.9   16000    2.125    3.125      125.0'
    '   28,875.0      125',
    '    3     160–200    0.0008      0.9     128    3.117    3.125   15,625.0'
    '   78,125.0   15,625',
  ):
    assert row in output.splitlines()
  assert '49,250.0 saved, 2.71× fewer' in output
  assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_reports_a_bad_config_as_a_usage_error(tmp_path):
  config_file = tmp_path / 'cifar10_recipe.py'
  config_file.write_text(CONFIG_FILE)
  _, status, stderr = _run_cli(
    f'--config={config_file}:hybrid', '--config.schedule.max_batch_size=64'
  )
  assert status['exit'] == 2
  assert 'max_batch_size=64' in stderr and 'Traceback' not in stderr
