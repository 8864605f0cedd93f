"""Parallel runs equal the single-device run: 8 fake CPU devices, 2 localhost processes.

The pytest process has one CPU device, and JAX fixes the device count when its backend
starts, so every parallel run happens in a subprocess (`JAX_NUM_CPU_DEVICES`); the
reference runs here, on the one device, and the two are compared through saved arrays
or checkpoints.

Ghost batch norm makes the comparisons exact up to float32 summation order: gradients are
means over the same examples whatever the split. The running BN statistics see the same
ghost batches, but in the order the step visits them, which is stream order unless both
the accumulation count A > 1 and devices > 1 (then micro-batch a holds every device's
a-th chunk). The tests either keep A = 1 on the parallel side, or compare against the
single-device run on the batch permuted into that visiting order. Across devices those
averages are one sum over devices of closed-form shares (ibs/models/ghost_batch_norm.py),
the sequential update's terms added in another order: n ≤ 64 float32 terms with weights
≤ 1 differ by at most about n·2⁻²⁴ ≈ 4e-6 relative, inside the rtol 1e-5 below.
"""

import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from ibs import optim, schedules, sharding
from ibs import step as step_lib
from ibs.models import small
from ibs.tools import hlo

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # per subprocess: a hung collective fails the test instead of CI
DEVICES = 8
GHOST = 4
BATCH = 64  # 8 devices × 8 examples = 16 ghost batches
LENGTH = 16
NUM_STEPS = 3


def _cpu_env(num_devices, **extra):
  """This environment for a child JAX process on `num_devices` CPU devices.

  A device count in XLA_FLAGS is dropped (it would compete with JAX_NUM_CPU_DEVICES);
  the other flags are kept, so the child compiles as this process does (conftest.py).
  """
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(
    flag
    for flag in env.get('XLA_FLAGS', '').split()
    if not flag.startswith('--xla_force_host_platform_device_count')
  )
  env.update(
    JAX_PLATFORMS='cpu',
    JAX_NUM_CPU_DEVICES=str(num_devices),
    TF_CPP_MIN_LOG_LEVEL='2',
    **extra,
  )
  return env


def _run_python(args, num_devices, timeout=TIMEOUT_S, cwd=REPO):
  """Runs `python args...` with `num_devices` CPU devices; fails the test on error."""
  pythonpath = os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])
  result = subprocess.run(
    [sys.executable, *args],
    cwd=cwd,
    env=_cpu_env(num_devices, PYTHONPATH=pythonpath),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert result.returncode == 0, (
    f'{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}'
  )
  return result


# ------------------------------------------------------------- one step, 8 devices vs 1


def _state():
  model = small.CNN1D(num_classes=10, ghost_batch_size=GHOST, width=8, depth=2)
  variables = model.init(jax.random.key(0), jnp.zeros((GHOST, LENGTH)), train=False)
  schedule = schedules.Schedule(
    phases=(schedules.Phase(0.0, BATCH, 0.1, 0.9),),
    num_epochs=100.0,
    num_train_examples=BATCH,
  )
  return step_lib.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=jax.tree.map(lambda x: x + 0.3, variables['batch_stats']),
    tx=optim.create_optimizer('momentum', schedule, weight_decay=5e-4),
  )


def _batches():
  rng = np.random.default_rng(1)
  return [
    {
      'input': rng.normal(size=(BATCH, LENGTH)).astype(np.float32),
      'label': rng.integers(0, 10, size=BATCH).astype(np.int32),
    }
    for _ in range(NUM_STEPS)
  ]


def _compile(mesh, plan, host_loop=False):
  state = jax.device_put(_state(), sharding.replicated(mesh))
  example = {k: v[:1] for k, v in _batches()[0].items()}
  (step,) = step_lib.compile_train_steps(
    mesh,
    state,
    [plan],
    example,
    ghost_batch_size=GHOST,
    options=step_lib.StepOptions(gns_horizon_examples=1000.0),
    host_loop=host_loop,
  ).values()
  return state, step


def _run_steps(max_micro_batch_size, order=None, host_loop=False, devices=None):
  """NUM_STEPS ibs steps on all devices (a mesh in the order of `devices` if given);
  `order` permutes each batch's examples."""
  mesh = sharding.make_mesh(devices)
  plan = sharding.plan_micro_batches(BATCH, mesh.size, GHOST, max_micro_batch_size)
  state, step = _compile(mesh, plan, host_loop)
  losses = []
  for local in _batches():
    if order is not None:
      local = {k: v[order] for k, v in local.items()}
    state, metrics = step(state, [local], step_lib.empty_metrics(mesh))
    losses.append(float(metrics.compute()['loss']))
  out = {'loss': np.array(losses), 'accumulation': plan.accumulation}
  for name in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, name)):
      out[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def sharded_steps_main(path):
  """Entry point of the 8-device subprocess: steps, batch layouts and HLO
  counts, to npz."""
  assert jax.device_count() == DEVICES, jax.devices()
  permuted = [jax.devices()[i] for i in (3, 0, 6, 1, 7, 2, 5, 4)]
  results = {}
  for name, cap, host_loop, devices in (
    ('a1', 8, False, None),
    ('a2', 4, False, None),
    ('a2host', 4, True, None),
    ('a2permuted', 4, False, permuted),
  ):
    for key, value in _run_steps(cap, host_loop=host_loop, devices=devices).items():
      results[f'{name}/{key}'] = value
  # Which stream positions each mesh position holds, for a plan with A = 2.
  for name, devices in (('layout', None), ('layout_permuted', permuted)):
    mesh = sharding.make_mesh(devices)
    plan = sharding.plan_micro_batches(BATCH, DEVICES, GHOST, 4)
    batch = sharding.train_batches_to_device(
      [{'label': np.arange(BATCH)}], plan, mesh, 1
    )['label']
    by_device = {s.device: np.asarray(s.data)[0] for s in batch.addressable_shards}
    results[name] = np.stack([by_device[d] for d in mesh.devices.flat])
  np.savez(path, **results)


def _visiting_order(accumulation, micro):
  """Stream positions in the order the step visits them: micro-batch-major,
  then device."""
  per_device = accumulation * micro
  return np.array(
    [
      d * per_device + a * micro + i
      for a in range(accumulation)
      for d in range(DEVICES)
      for i in range(micro)
    ]
  )


def _assert_runs_equal(parallel, reference, prefix):
  keys = [k for k in reference if k.startswith(('params', 'batch_stats'))]
  assert keys
  for key in keys:
    np.testing.assert_allclose(
      parallel[f'{prefix}/{key}'], reference[key], rtol=1e-5, atol=1e-6, err_msg=key
    )
  np.testing.assert_allclose(parallel[f'{prefix}/loss'], reference['loss'], rtol=1e-5)


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(tmp_path):
  assert jax.device_count() == 1, (
    'The single-device reference runs in the pytest process itself: run pytest without '
    'XLA_FLAGS/--xla_force_host_platform_device_count (the parallel runs start their own '
    'processes with 8 devices).'
  )
  path = tmp_path / 'sharded.npz'
  _run_python(
    [
      '-c',
      f'from tests import test_multidevice as t; t.sharded_steps_main({str(path)!r})',
    ],
    DEVICES,
  )
  parallel = dict(np.load(path))

  # Mesh position d holds the contiguous positions [d·A·b, (d + 1)·A·b), as (A, b),
  # whatever device sits there.
  expected_layout = np.arange(BATCH).reshape(DEVICES, 2, 4)
  np.testing.assert_array_equal(parallel['layout'], expected_layout)
  np.testing.assert_array_equal(parallel['layout_permuted'], expected_layout)

  # A = 1 on 8 devices: the stream order; the one device accumulates A = 4 of 16.
  assert parallel['a1/accumulation'] == 1
  reference = _run_steps(16)
  assert reference['accumulation'] == 4
  _assert_runs_equal(parallel, reference, 'a1')

  # A = 2 on 8 devices: same gradients; the BN statistics follow the visiting order,
  # with the scan and with the host loop alike.
  assert parallel['a2/accumulation'] == 2
  reference = _run_steps(BATCH, order=_visiting_order(2, 4))
  _assert_runs_equal(parallel, reference, 'a2')
  _assert_runs_equal(parallel, reference, 'a2host')
  # A mesh built from a permuted device list: the layout follows the mesh, same run.
  _assert_runs_equal(parallel, reference, 'a2permuted')


# ------------------------------------------------ what crosses devices, from the HLO

COLLECTIVE_BATCHES = (2 * BATCH, 8 * BATCH)  # cap 4: A = 4 and A = 16 micro-batches
OTHER_COLLECTIVES = (
  'all-gather',
  'all-gather-start',
  'reduce-scatter',
  'collective-permute',
  'collective-permute-start',
  'all-to-all',
)


def collectives_main(path):
  """Entry point of the 8-device subprocess: the collectives of steps compiled from
  abstract shapes at two batch sizes, to npz."""
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = sharding.make_mesh()
  plans = [sharding.plan_micro_batches(b, DEVICES, GHOST, 4) for b in COLLECTIVE_BATCHES]
  example = {k: v[:1] for k, v in _batches()[0].items()}
  steps = step_lib.compile_train_steps(
    mesh,
    jax.eval_shape(_state),
    plans,
    example,
    ghost_batch_size=GHOST,
    options=step_lib.StepOptions(gns_horizon_examples=1000.0),
    host_loop=False,
  )
  results = {}
  for plan in plans:
    text = steps[plan.shape].as_text()
    found = hlo.collectives(text)
    results[f'{plan.batch_size}/accumulation'] = plan.accumulation
    results[f'{plan.batch_size}/all_reduces'] = np.array(
      [(c.bytes, c.in_loop) for c in found]
    ).reshape(-1, 2)
    results[f'{plan.batch_size}/per_update'] = hlo.all_reduce_bytes_per_update(text)
    results[f'{plan.batch_size}/others'] = len(hlo.collectives(text, OTHER_COLLECTIVES))
  np.savez(path, **results)


def test_one_all_reduce_per_update_the_same_at_every_batch_size(tmp_path):
  """What crosses devices per update is the gradient plus O(features), whatever B.

  Counted by hand from `_state`'s CNN1D (width 8, depth 2, kernel 3, one input channel,
  10 classes): parameters 3·1·8 + 3·8·8 (kernels) + 2·(8 + 8) (BN scale and bias) +
  8·10 + 10 (classifier) = 338 floats; running BN statistics 2 layers × (8 means + 8
  variances) = 32 floats, each device's closed-form share of them summed once per update
  (ibs/models/ghost_batch_norm.py), not gathered per ghost batch. The rest are scalars
  (the metric sums and the noise-scale norm: 5 today).
  """
  path = tmp_path / 'collectives.npz'
  _run_python(
    ['-c', f'from tests import test_multidevice as t; t.collectives_main({str(path)!r})'],
    DEVICES,
  )
  found = dict(np.load(path))
  gradient_bytes = 4 * (3 * 1 * 8 + 3 * 8 * 8 + 2 * (8 + 8) + 8 * 10 + 10)
  bn_bytes = 4 * 2 * (8 + 8)
  per_update = []
  for batch_size, accumulation in zip(COLLECTIVE_BATCHES, (4, 16), strict=True):
    assert found[f'{batch_size}/accumulation'] == accumulation
    # One all-reduce, after the micro-batch loop; no gather or other collective.
    all_reduces = found[f'{batch_size}/all_reduces']
    assert len(all_reduces) == 1 and not all_reduces[0][1], all_reduces
    assert found[f'{batch_size}/others'] == 0
    per_update.append(int(found[f'{batch_size}/per_update']))
  assert per_update[0] == per_update[1], per_update
  scalars = per_update[0] - gradient_bytes - bn_bytes
  assert scalars % 4 == 0 and 1 <= scalars // 4 <= 8, (per_update, scalars)


# ------------------------------------------------- training end to end, parallel vs one


def _parallel_config(data_dir):
  """The tiny default config with ghost batches of 4, so 4 or 8 devices split it.

  Two phases, B = 32 then 64, over 2 epochs of 2000 examples (94 steps; phase 1 runs
  steps 63–93). Per-device cap 32: A = 1 on 4 or 8 devices, A = 1 then 2 on one device,
  so every run visits the ghost batches in stream order.
  """
  config = default.get_config()
  config.data_dir = data_dir
  config.mnist1d.num_train = 2000
  config.mnist1d.num_test = 500
  config.model_kwargs.width = 16
  config.ghost_batch_size = GHOST
  config.schedule.num_epochs = 2.0
  config.schedule.milestones = (1.0,)
  config.schedule.batch_size = 32
  config.schedule.decay_factor = 2.0
  config.max_micro_batch_size = 32
  config.eval_batch_size = 200  # divisible by 4 and 8 devices
  config.eval_every_epochs = 2.0
  config.checkpoint_every_epochs = 2.0
  return config


def _final_state(workdir):
  """(step, params, batch_stats) of the latest checkpoint, whatever topology saved it."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  manager.close()
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree
  )
  state = checkpointer.restore(path, abstract)
  return step, *(jax.tree.map(np.asarray, state[k]) for k in ('params', 'batch_stats'))


def _assert_states_equal(actual, expected):
  step_a, *trees_a = actual
  step_b, *trees_b = expected
  assert step_a == step_b
  for name, a, b in zip(('params', 'batch_stats'), trees_a, trees_b, strict=True):
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b
    )
    worst = max(
      jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b))
    )
    print(f'{name}: largest difference {worst:.2e} after {step_a} steps')  # pytest -s


@pytest.fixture(scope='module')
def one_device_run(data_dir, tmp_path_factory):
  """The parallel config trained here, on one device, on the host pipeline: (config,
  final state). The parallel runs place the data on their devices ('auto', MNIST-1D
  fits) unless a test says otherwise: the same batches, built another way."""
  from ibs import train

  assert jax.device_count() == 1, (
    'The single-device reference runs in the pytest process itself: run pytest without '
    'XLA_FLAGS/--xla_force_host_platform_device_count (the parallel runs start their own '
    'processes with 8 devices).'
  )
  config = _parallel_config(data_dir)
  config.resident_data = 'off'
  workdir = str(tmp_path_factory.mktemp('one_device'))
  summary = train.train_and_evaluate(config, workdir)
  assert summary['finished']
  return config, _final_state(workdir)


def _train_script(config, tmp_path):
  """A config file for ibs.main that loads `config` (pickled beside it)."""
  with open(tmp_path / 'config.pkl', 'wb') as f:
    pickle.dump(config, f)
  script = tmp_path / 'config.py'
  script.write_text(
    textwrap.dedent(
      """
          import os
          import pickle

          def get_config():
            here = os.path.dirname(os.path.abspath(__file__))
            with open(os.path.join(here, 'config.pkl'), 'rb') as f:
              return pickle.load(f)
          """
    )
  )
  return script


@pytest.mark.slow
@pytest.mark.parametrize('resident_data', ['on', 'off'])
def test_training_on_8_devices_equals_1_device(one_device_run, tmp_path, resident_data):
  """End to end on 8 fake devices, the data on the devices or from the host pipeline;
  also checks the persistent compilation cache fills.

  Float tolerance (1e-5) after 94 steps: the all-reduced gradient is summed in another
  order than the single device's; the largest difference measured was 5e-7.
  """
  config, expected = one_device_run
  config = config.copy_and_resolve_references()
  config.resident_data = resident_data
  cache = tmp_path / 'cache'
  config.compilation_cache_dir = str(cache)
  workdir = tmp_path / 'run'
  script = _train_script(config, tmp_path)
  _run_python(
    ['-m', 'ibs.main', f'--config={script}', f'--workdir={workdir}'], num_devices=DEVICES
  )
  _assert_states_equal(_final_state(str(workdir)), expected)
  assert any('_updates' in name for name in os.listdir(cache)), os.listdir(cache)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_processes(
  script, workdir, log_dir, name, num_processes=2, devices_per_process=2, **env
):
  """One ibs.main per process on localhost (gloo collectives), with the `env` overrides;
  each Popen's output goes to its `.log`, LOG_DIR/NAME_I.log."""
  port = _free_port()
  processes = []
  for i in range(num_processes):
    log = open(log_dir / f'{name}_{i}.log', 'w+')  # noqa: SIM115 - the caller closes it
    process = subprocess.Popen(
      [
        sys.executable,
        '-m',
        'ibs.main',
        f'--config={script}',
        f'--workdir={workdir}',
        f'--coordinator_address=127.0.0.1:{port}',
        f'--num_processes={num_processes}',
        f'--process_id={i}',
      ],
      cwd=REPO,
      env=_cpu_env(devices_per_process, **env),
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    process.log = log
    processes.append(process)
  return processes


def _launch_processes(script, workdir, name, num_processes=2, devices_per_process=2):
  """start_processes, then waits for all; all must succeed."""
  processes = start_processes(
    script, workdir, workdir.parent, name, num_processes, devices_per_process
  )
  # One deadline for all; a process that fails ends the launch at once (its peers would
  # otherwise wait for it until the coordinator's heartbeat timeout).
  # Every process compiles, on the same cores.
  deadline = time.monotonic() + TIMEOUT_S * max(1.0, num_processes / 2)
  try:
    while time.monotonic() < deadline:
      codes = [p.poll() for p in processes]
      if None not in codes or any(code for code in codes if code is not None):
        break
      time.sleep(0.5)
  finally:
    for p in processes:  # Only ours, by handle: nothing may outlive the test.
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = [p.returncode for p in processes]
  outputs = []
  for p in processes:
    p.log.seek(0)
    outputs.append(p.log.read())
    p.log.close()
  assert codes == [0] * num_processes, '\n'.join(
    f'--- process {i}\n{text[-6000:]}' for i, text in enumerate(outputs)
  )
  return outputs


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
  ('num_processes', 'devices_per_process', 'resident_data'),
  [(2, 1, 'auto'), (2, 2, 'auto'), (4, 1, 'auto'), (2, 2, 'off')],
  ids=str,
)
def test_process_layouts_equal_one_process(
  one_device_run, tmp_path, num_processes, devices_per_process, resident_data
):
  """2 × 1, 2 × 2 and 4 × 1 processes × devices, preempted inside phase 1 and resumed:
  the one-device run (host pipeline), with the data on every process's devices ('auto')
  or from each process's host pipeline. One device per process is the usual
  GPU-cluster layout; there every array the checkpoint saves must have been laid out on
  the mesh (sharding.replicate). Logs, evaluations and checkpoints fall on the same steps
  (every epoch: steps 63 and 94, the last), where a log resets the running metrics the
  checkpoint saves; the stop at 70 checkpoints alone.

  Both launches use orbax on one shared directory from every process; the resumed one
  restores the checkpoint written by all. They share a persistent compilation cache,
  so the second launch does not compile again.
  """
  config, expected = one_device_run
  config = config.copy_and_resolve_references()
  config.compilation_cache_dir = str(tmp_path / 'cache')
  config.resident_data = resident_data
  # Not trajectory fields: the one-device run's parameters are those of any cadence.
  config.log_every_epochs = config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 1.0
  workdir = tmp_path / 'run'
  first = config.copy_and_resolve_references()
  first.stop_after_steps = 70  # Phase 1 runs steps 63–93.
  layout = (num_processes, devices_per_process)
  _launch_processes(_train_script(first, tmp_path), workdir, 'first', *layout)
  assert _final_state(str(workdir))[0] == 70

  outputs = _launch_processes(
    _train_script(config, tmp_path), workdir, 'resumed', *layout
  )
  assert all('Resumed at step 70' in text for text in outputs)
  _assert_states_equal(_final_state(str(workdir)), expected)
  steps = sorted(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  assert steps == [63, 70, 94], steps
  assert 'test loss' in outputs[0] and 'final test accuracy' in outputs[0]  # eval logged
