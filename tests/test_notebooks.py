"""The notebooks run top to bottom; experiments/plots.py and results.py on a real grid.

The grid is two runs of the MNIST-1D study shrunk to seconds (500 examples, 2 epochs, B 32
with or without doubling at epoch 1), trained with train_and_evaluate into the layout
experiments/reproduce.py uses, under a tiny experiment patched into reproduce.EXPERIMENTS.
"""

import json
import math
import os
import pathlib
import shutil
import sys
import time

import nbformat
import numpy as np
import pytest

from experiments import plots, reproduce, results
from ibs import train

REPO = pathlib.Path(__file__).resolve().parents[1]

NOTEBOOKS = ('schedule_explorer', 'results', 'colab_tpu_quickstart')
TINY = 'tiny_study'
TINY_RUNS = [
  ('configs/mnist1d_study.py', f'optimizer=momentum,schedule={schedule}')
  for schedule in ('decaying_lr', 'increasing_batch')
]
DECAYING, INCREASING = (arg for _, arg in TINY_RUNS)


def _tiny_config(path, arg, data_dir):
  config = reproduce.load_config(path, arg)
  config.data_dir = data_dir
  config.mnist1d.num_train, config.mnist1d.num_test = 500, 250
  config.model_kwargs.width, config.model_kwargs.depth = 8, 1
  s = config.schedule
  s.num_epochs, s.milestones, s.decay_factor = 2.0, (1.0,), 2.0
  config.eval_batch_size = 250
  config.log_every_epochs = 0.5
  config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 2.0
  return config


@pytest.fixture(scope='module')
def grid(tmp_path_factory, data_dir):
  """(root, {argument: summary}) of the tiny grid, seed 0."""
  root = str(tmp_path_factory.mktemp('grid'))
  summaries = {}
  for path, arg in TINY_RUNS:
    workdir = reproduce.run_workdir(root, path, arg, 0)
    summaries[arg] = train.train_and_evaluate(_tiny_config(path, arg, data_dir), workdir)
  return root, summaries


@pytest.fixture
def tiny_experiment(monkeypatch):
  monkeypatch.setitem(reproduce.EXPERIMENTS, TINY, TINY_RUNS)


def _workdir(root, arg, seed=0):
  return reproduce.run_workdir(root, 'configs/mnist1d_study.py', arg, seed)


@pytest.mark.slow
def test_read_scalars_of_a_real_run(grid):
  root, summaries = grid
  scalars = plots.read_scalars(_workdir(root, INCREASING))
  logged = [
    'train_loss',
    'train_accuracy',
    'test_loss',
    'test_accuracy',
    'learning_rate',
    'momentum',
    'batch_size',
    'g_sgd',
    'phase',
    'epoch',
    'examples_seen',
    'parameter_updates',
  ]
  assert set(logged) <= set(scalars)

  # By hand: 16 steps of 32 (to 512 examples), then 8 of 64 (to 1024). Logs every 250
  # examples fire at the steps crossing 250, 500, 750, 1000: 8, 16, 20, 24; evaluations
  # every 500 at 16 (512 examples) and at the end.
  steps, batch = scalars['batch_size']
  np.testing.assert_array_equal(steps, [8, 16, 20, 24])
  np.testing.assert_array_equal(batch, [32, 32, 64, 64])
  np.testing.assert_array_equal(scalars['parameter_updates'][1], [8, 16, 20, 24])
  epochs, accuracy = plots.against(scalars, 'test_accuracy', 'epoch')
  np.testing.assert_allclose(epochs, [512 / 500, 1024 / 500], rtol=1e-6)
  summary = summaries[INCREASING]
  assert summary['parameter_updates'] == 24
  assert accuracy[-1] == pytest.approx(summary['test_accuracy'], rel=1e-6)
  x, _ = plots.against(scalars, 'train_loss', 'parameter_updates')
  np.testing.assert_array_equal(x, [8, 16, 20, 24])


def test_read_scalars_keeps_the_rewritten_steps_of_a_resumed_run(tmp_path):
  from clu import metric_writers

  first = metric_writers.create_default_writer(str(tmp_path))
  for step in (1, 2, 3, 4):  # Preempted after step 4, last checkpoint at step 2.
    first.write_scalars(step, {'train_loss': float(step)})
  first.write_scalars(4, {'epoch': 0.4})
  first.write_scalars(4, {'epoch': 0.5})  # A step logged twice keeps its last value.
  first.close()
  # Event files are read in name order, and the names start with the creation second;
  # within one second (one process here, unlike a real resume) they end in a counter
  # that sorts as text ('10' before '9'). A real resume starts seconds later.
  time.sleep(1.1)
  resumed = metric_writers.create_default_writer(str(tmp_path))
  for step in (3, 4, 5):
    resumed.write_scalars(step, {'train_loss': 100.0 + step})
  resumed.close()

  scalars = plots.read_scalars(str(tmp_path))
  np.testing.assert_array_equal(scalars['train_loss'][0], [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(scalars['train_loss'][1], [1, 2, 103, 104, 105])
  assert scalars['epoch'][1].tolist() == [0.5]


def test_seed_band_averages_the_seeds_found_at_each_step():
  def run(steps, values):
    steps = np.array(steps)
    return {'epoch': (steps, steps / 10), 'test_accuracy': (steps, np.array(values))}

  seeds = [run([1, 2, 3], [0.2, 0.4, 0.6]), run([1, 2], [0.4, 0.8])]  # one unfinished
  x, mean, low, high = plots.seed_band(seeds, 'test_accuracy', 'epoch')
  np.testing.assert_allclose(x, [0.1, 0.2, 0.3])
  np.testing.assert_allclose(mean, [0.3, 0.6, 0.6])
  np.testing.assert_allclose(low, [0.2, 0.4, 0.6])
  np.testing.assert_allclose(high, [0.4, 0.8, 0.6])
  assert all(len(v) == 0 for v in plots.seed_band(seeds, 'train_loss', 'epoch'))


def test_experiment_groups_split_optimizers_and_label_schedules():
  groups = plots.experiment_groups('mnist1d_5_1')
  assert list(groups) == ['momentum', 'nesterov', 'sgd', 'adam']
  assert list(groups['sgd']) == ['decaying_lr', 'hybrid', 'increasing_batch']
  assert groups['sgd']['hybrid'] == (
    'configs/mnist1d_study.py',
    'optimizer=sgd,schedule=hybrid',
  )
  assert list(plots.experiment_groups('imagenet_5_3')['all']) == [
    'decaying_lr',
    'increasing_batch',
    'momentum=0.95',
    'momentum=0.975',
  ]
  assert list(plots.experiment_groups('resnet50_5_4')['all']) == [
    'default',
    'decaying_lr',
  ]


@pytest.mark.slow
def test_plots_writes_the_figures_of_a_grid(grid, tiny_experiment, tmp_path):
  root, _ = grid
  out = tmp_path / 'figures'
  written = plots.plot_experiment(TINY, root, [0, 1], str(out))
  assert written == [str(out / f'{TINY}_momentum{s}.png') for s in ('', '_schedules')]
  for path in written:
    assert os.path.getsize(path) > 20_000  # A drawn figure, not an empty canvas.

  runs = plots.load_group(plots.experiment_groups(TINY)['momentum'], root, [0, 1])
  figure = plots.plot_runs(runs, plots.LEARNING_CURVES)
  assert len(figure.axes) == 4
  for ax in figure.axes:
    assert [line.get_label() for line in ax.lines] == [
      'decaying_lr (1 seed)',
      'increasing_batch (1 seed)',
    ]
  # Per update, the increasing batch ends sooner: 24 updates against 32.
  updates = figure.axes[1]
  assert [line.get_xdata()[-1] for line in updates.lines] == [32, 24]


def test_plots_runs_as_a_script(tmp_path):
  import subprocess

  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.plots',
      '--experiment=mnist1d_5_2',
      f'--root={tmp_path / "empty"}',
      f'--out={tmp_path / "figures"}',
    ],
    capture_output=True,
    text=True,
    check=True,
    cwd=REPO,
  )
  assert 'mnist1d_5_2 momentum: no event files' in done.stdout


def _write_summary(root, arg, seed, accuracy, updates, wall_clock):
  workdir = _workdir(root, arg, seed)
  os.makedirs(workdir, exist_ok=True)
  summary = {'test_accuracy': accuracy, 'parameter_updates': updates}
  summary['wall_clock_s'] = wall_clock
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f)


@pytest.mark.slow
def test_results_tables_of_a_grid(grid, tiny_experiment, tmp_path):
  root, summaries = grid
  runs = results.load_runs(TINY, root, [0])
  accuracy = 100 * summaries[DECAYING]['test_accuracy']
  rows = results.table(runs).splitlines()
  assert rows[2].startswith(f'| {DECAYING} | 1 | {accuracy:.2f} ± 0.00 | 32 | ')
  assert rows[3].startswith(f'| {INCREASING} | 1 | ')
  assert '| 24 |' in rows[3]
  assert results.table(results.load_runs(TINY, root, [7])).splitlines()[2:] == [
    f'| {DECAYING} | 0 | – | – | – |',
    f'| {INCREASING} | 0 | – | – | – |',
  ]

  # Two more seeds with accuracies chosen by hand, in a copy of the grid.
  hand = str(tmp_path / 'hand')
  shutil.copytree(root, hand)
  for arg, updates, accuracies in (
    (DECAYING, 32, (0.90, 0.92)),
    (INCREASING, 24, (0.91, 0.93)),
  ):
    for seed, value in zip((1, 2), accuracies, strict=True):
      _write_summary(hand, arg, seed, value, updates, wall_clock=10.0 * seed)
  runs = results.load_runs(TINY, hand, [1, 2])
  # Means 91 and 92, each stdev √2 = 1.41; wall-clock (10 + 20) / 2.
  assert results.table(runs).splitlines()[2:] == [
    f'| {DECAYING} | 2 | 91.00 ± 1.41 | 32 | 15 |',
    f'| {INCREASING} | 2 | 92.00 ± 1.41 | 24 | 15 |',
  ]
  # Difference +1 point; SE = 100·√(0.0002/2 + 0.0002/2) = 1.414, 2 SE = 2.83; 32/24.
  assert results.claim_table(runs).splitlines()[2:] == [
    f'| {INCREASING} | +1.00 | 2.83 | yes | 1.33× |'
  ]
  figures = plots.plot_experiment(TINY, hand, [0, 1, 2], str(tmp_path / 'figures'))
  assert len(figures) == 2  # Seeds with a summary but no event files are not plotted.


@pytest.mark.parametrize(
  'ours, baseline, difference, standard_error, within',
  [
    # Means 0.92 and 0.92; variances 0.0004 and 0.0001: SE = 100·√(0.0005/3) = 1.291.
    ([0.90, 0.92, 0.94], [0.91, 0.92, 0.93], 0.0, 1.2910, True),
    # +2 points, SE = 100·√(0.0008/2 + 0.0002/2) = 2.236: within 2 SE though above 0.5.
    ([0.90, 0.94], [0.89, 0.91], 2.0, 2.2361, True),
    # −10 points, SE = 100·√(0.00005/2 + 0.00005/2) = 0.707: outside.
    ([0.80, 0.81], [0.90, 0.91], -10.0, 0.7071, False),
    # One seed a side: no SE, the 0.5-point rule alone.
    ([0.924], [0.920], 0.4, math.nan, True),
    ([0.914], [0.920], -0.6, math.nan, False),
  ],
)
def test_claim_holds_by_hand(ours, baseline, difference, standard_error, within):
  got_difference, got_se, got_within = results.claim_holds(ours, baseline)
  assert got_difference == pytest.approx(difference, abs=1e-9)
  if math.isnan(standard_error):
    assert math.isnan(got_se)
  else:
    assert got_se == pytest.approx(standard_error, abs=1e-4)
  assert got_within is within


@pytest.mark.parametrize(
  'experiment, compared',
  [
    # No optimizer= in the arguments; the momentum runs start at a larger batch.
    ('imagenet_5_3', ['schedule=increasing_batch', 'momentum=0.95', 'momentum=0.975']),
    # resnet50_tpu.py takes bare variants: '' (its own schedule) and 'decaying_lr'.
    ('resnet50_5_4', ['default']),
    (
      'cifar10_5_2',
      [
        f'optimizer=momentum,schedule={schedule}'
        for schedule in ('increasing_batch_5120', 'increased_lr', 'increased_momentum')
      ],
    ),
  ],
)
def test_claim_table_compares_each_grid_with_its_decaying_lr_run(experiment, compared):
  # One seed per run: decaying LR 76.0% in 10,000 updates, every other run 75.7% in 5,000.
  runs = {}
  for _, arg in reproduce.EXPERIMENTS[experiment]:
    baseline = 'decaying_lr' in arg
    runs[arg] = [
      {
        'test_accuracy': 0.760 if baseline else 0.757,
        'parameter_updates': 10_000 if baseline else 5_000,
        'wall_clock_s': 1.0,
      }
    ]
  assert results.claim_table(runs).splitlines()[2:] == [
    f'| {arg} | -0.30 | nan | yes | 2.00× |' for arg in compared
  ]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  notebook = nbformat.read(REPO / 'notebooks' / f'{name}.ipynb', as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
        f'{name}.ipynb has outputs; clear them before committing.'
      )


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, data_dir, monkeypatch):
  from nbclient import NotebookClient

  # A python3 kernel of this interpreter, whatever kernels the machine has installed.
  spec = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(
    json.dumps(
      {
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'Python 3',
        'language': 'python',
      }
    )
  )
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('IBS_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('IBS_NOTEBOOK_OUTPUT', str(tmp_path / 'output'))
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  notebook = nbformat.read(REPO / 'notebooks' / f'{name}.ipynb', as_version=4)
  client = NotebookClient(
    notebook,
    timeout=300,  # per cell
    kernel_name='python3',
    resources={'metadata': {'path': str(REPO / 'notebooks')}},  # as Jupyter runs it
  )
  client.execute()  # Raises CellExecutionError, with the traceback, if a cell fails.
  images = [
    output
    for cell in notebook.cells
    for output in cell.get('outputs', [])
    if 'image/png' in output.get('data', {})
  ]
  assert images, f'{name}.ipynb drew no figure inline.'
