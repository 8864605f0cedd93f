"""Faults a shared cluster or a TPU pod throws at a run (docs/RELIABILITY.md).

SIGTERM/SIGINT at random moments, a second signal, a second run on the same workdir,
divergence (stop and skip), elastic resume on another device count, and, under 2
processes, a SIGTERM to one process and the loss of a peer. Every interrupted run is
rerun with the same command and must end where the uninterrupted run ends.
"""

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ibs import train
from ibs.data import pipeline
from ibs.durability import checkpoint, divergence, lock, preemption
from tests.test_multidevice import (  # noqa: F401 - one_device_run is a fixture
  REPO,
  _assert_states_equal,
  _cpu_env,
  _final_state,
  _train_script,
  one_device_run,
  start_processes,
)
from tests.test_train import latest_state

TIMEOUT_S = 300


def _state_arrays(workdir):
  """(step, every array of the latest checkpoint's state, flattened by path)."""
  step, state = latest_state(workdir)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  return step, {jax.tree_util.keystr(p): x for p, x in leaves}


def _assert_identical(workdir_a, workdir_b):
  step_a, a = _state_arrays(workdir_a)
  step_b, b = _state_arrays(workdir_b)
  assert step_a == step_b
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _start(script, workdir, log_path, num_devices=1):
  pythonpath = os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])
  log = open(log_path, 'w+')  # noqa: SIM115 - closed by _finish
  process = subprocess.Popen(
    [sys.executable, '-m', 'ibs.main', f'--config={script}', f'--workdir={workdir}'],
    cwd=REPO,
    env=_cpu_env(num_devices, PYTHONPATH=pythonpath),
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  process.log = log
  return process


def _wait_for(process, pattern, timeout=TIMEOUT_S):
  """Waits until the process's log matches `pattern` (or the process ends)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    process.log.seek(0)
    if re.search(pattern, process.log.read()):
      return True
    time.sleep(0.05)
  return False


def _finish(process, timeout=TIMEOUT_S):
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
  process.log.seek(0)
  output = process.log.read()
  process.log.close()
  return process.returncode, output


@pytest.fixture(scope='module')
def reference(tiny_run):
  """The tiny default config (1 checkpoint period inside the run), run uninterrupted:
  (config, workdir), conftest's tiny_run. K = 8 updates per dispatch, the default."""
  config, workdir, _ = tiny_run
  return config, workdir


def _sigterm_trial(config, tmp_path, name, sig=signal.SIGTERM, delay=None, twice=False):
  """One run signalled at a random moment of training, then a rerun; returns details."""
  script = _train_script(config, tmp_path)
  workdir = tmp_path / name
  process = _start(script, workdir, tmp_path / f'{name}.log')
  assert _wait_for(process, r'Phase 0:'), 'training never started'
  time.sleep(random.uniform(0.0, 2.0) if delay is None else delay)
  process.send_signal(sig)
  if twice:
    time.sleep(0.01)
    process.send_signal(sig)
  rc, output = _finish(process)
  saved = re.search(r'stopped at step (\d+) with a checkpoint', output)
  if rc == preemption.EXIT_PREEMPTED:
    assert saved, output[-3000:]
    assert _state_arrays(str(workdir))[0] == int(saved.group(1))  # No work lost.
  elif twice and rc == 128 + sig:
    pass  # Exited at once, nothing saved: the rerun resumes from the last checkpoint.
  else:  # The signal came after training: finished, or killed in the teardown.
    assert rc in (0, -sig) and 'final test accuracy' in output, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  rerun = _start(script, workdir, tmp_path / f'{name}_rerun.log')
  rc_rerun, rerun_output = _finish(rerun)
  assert rc_rerun == 0, rerun_output[-3000:]
  return rc, saved and int(saved.group(1)), str(workdir)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_rerun_ends_identical(reference, tmp_path):
  config, expected = reference
  # Signalled as soon as training starts: on an idle machine all of it takes under a
  # second, and a later signal could find it done (random moments: the slow tests).
  rc, step, workdir = _sigterm_trial(config, tmp_path, 'sigterm', delay=0.0)
  assert rc == preemption.EXIT_PREEMPTED
  _assert_identical(workdir, expected)


@pytest.mark.slow
@pytest.mark.parametrize(
  ('sig', 'twice'),
  [
    (signal.SIGTERM, False),
    (signal.SIGTERM, False),
    (signal.SIGINT, False),
    (signal.SIGTERM, True),
  ],
  ids=['sigterm_random_1', 'sigterm_random_2', 'sigint_random', 'sigterm_twice'],
)
def test_signals_at_random_moments_then_rerun_end_identical(
  reference, tmp_path, sig, twice
):
  config, expected = reference
  _sigterm_trial(config, tmp_path, 'run', sig=sig, twice=twice)
  _assert_identical(str(tmp_path / 'run'), expected)


@pytest.mark.slow
def test_flipped_bytes_in_the_newest_checkpoint_resume_from_the_one_before(
  reference, tmp_path
):
  """The issue's silent corruption (it resumed and finished at 10% accuracy): the
  checksum rejects the newest checkpoint, the run resumes from the one before, and ends
  identical to the uninterrupted run."""
  from tests.test_checkpoint import _flip_bytes

  config, expected = reference
  workdir = tmp_path / 'run'
  shutil.copytree(expected, workdir)
  (workdir / 'summary.json').unlink()
  newest = max(int(p.name) for p in (workdir / 'checkpoints').iterdir())
  _flip_bytes(str(workdir / 'checkpoints' / str(newest)))
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['finished']
  assert (workdir / 'damaged_checkpoints' / str(newest)).is_dir()
  _assert_identical(str(workdir), expected)


def test_a_second_run_on_the_workdir_is_refused(tiny_config, tmp_path):
  with (
    lock.WorkdirLock(str(tmp_path)),
    pytest.raises(lock.WorkdirLocked, match=f'pid {os.getpid()} on host'),
  ):
    train.train_and_evaluate(tiny_config, str(tmp_path))


@pytest.mark.slow
def test_a_failed_background_save_is_reported_at_once_in_one_line(
  tiny_config, tmp_path, monkeypatch
):
  """The disk fills during the save of step 63 (the first period): the next dispatch
  stops the run with the cause and the last good checkpoint, not 20 tracebacks later."""
  config = tiny_config.copy_and_resolve_references()
  config.checkpoint_every_epochs = 1.0
  create = checkpoint.create_manager

  def failing_manager(*args, **kwargs):
    manager = create(*args, **kwargs)
    check = manager.check_for_errors

    def check_for_errors():
      check()
      if 63 in manager.all_steps():
        raise OSError(28, 'No space left on device')

    manager.check_for_errors = check_for_errors
    return manager

  monkeypatch.setattr(checkpoint, 'create_manager', failing_manager)
  with pytest.raises(checkpoint.CheckpointError) as info:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert '\n' not in message
  assert 'checkpoint of step 63 failed: [Errno 28] No space left on device' in message
  assert 'last good checkpoint is none' in message


@pytest.mark.slow
def test_sigterm_during_compilation_exits_75_at_once(tiny_config, tmp_path):
  """Before, the signal was honoured only after the compile and one dispatch (27 s
  seen): now at once, with nothing new to save."""
  config = tiny_config.copy_and_resolve_references()
  config.compilation_cache_dir = ''  # compiles for seconds, from scratch
  config.model_kwargs.width = 24  # a program no other test compiles
  process = _start(_train_script(config, tmp_path), tmp_path / 'run', tmp_path / 'log')
  assert _wait_for(process, r'Compiling the train step')
  process.send_signal(signal.SIGTERM)
  rc, output = _finish(process, timeout=60)
  assert rc == preemption.EXIT_PREEMPTED, output[-3000:]
  assert 'SIGTERM received before training began' in output
  assert 'Traceback' not in output and 'Phase 0:' not in output, output[-3000:]


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line(tiny_run, tmp_path):
  """A real write failure, without root: RLIMIT_FSIZE (10 kB, above the tiny run's
  small files, below its checkpoint data and metadata files) makes the first save's
  writes fail (EFBIG, as ENOSPC would). The run stops at the failed save: its one line
  names the step, the cause and the last good checkpoint, exit 2, and nothing follows
  it (before: 750 steps trained on without a checkpoint, then 90 tracebacks)."""
  import resource  # noqa: PLC0415

  config = tiny_run[0].copy_and_resolve_references()  # its data generated: only read
  config.checkpoint_every_epochs = 1.0
  script = _train_script(config, tmp_path)
  limit = 10_000

  def small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  env = _cpu_env(1, PYTHONPATH=str(REPO))
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # its entries are larger than the limit
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'ibs.main',
      f'--config={script}',
      f'--workdir={tmp_path / "w"}',
    ],
    cwd=REPO,
    env=env,
    preexec_fn=small_files,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )
  lines = result.stderr.strip().splitlines()
  print(f'exit {result.returncode}, {len(lines)} lines; the last two:')  # pytest -s
  print('\n'.join(lines[-2:]))
  assert result.returncode == 2, result.stderr[-4000:]
  assert lines[-2].startswith('error: Saving the checkpoint of step 63 failed:'), lines[
    -2
  ]
  # EFBIG, through Python (File too large) or tensorstore (OUT_OF_RANGE).
  assert re.search('File too large|OUT_OF_RANGE', lines[-2]), lines[-2]
  assert lines[-2].endswith(
    'The last good checkpoint is none (a rerun starts from scratch).'
  )
  assert lines[-1] == '(run with --verbosity=1 for the traceback)'
  assert 'final test accuracy' not in result.stdout


# ------------------------------------------------------------------------ divergence


def _poisoned_batches(monkeypatch, config, first, last):
  """Makes the train batches of steps first..last (counted from 0) all NaN: host
  batches (config.resident_data='off'), whose inputs are there to poison."""
  config.resident_data = 'off'
  original = pipeline.train_batches

  def batches(*args, **kwargs):
    start = kwargs['start_examples'] // kwargs['batch_size']
    for index, batch in enumerate(original(*args, **kwargs)):
      if first <= start + index <= last:
        batch = dict(batch, input=np.full_like(batch['input'], np.nan))
      yield batch

  monkeypatch.setattr(pipeline, 'train_batches', batches)


@pytest.mark.slow
def test_divergence_stops_before_checkpointing_nan_and_keeps_the_good_ones(
  tiny_config, tmp_path, monkeypatch
):
  """NaN batches from step 41 (phase 0, B = 32, steps of 32 examples): the step freezes
  the state at update 41 and the run stops at the next event, naming that update; the
  checkpoints on disk are the earlier, finite ones, all still there although more
  periods than max_to_keep passed."""
  config = tiny_config.copy_and_resolve_references()
  config.checkpoint_every_epochs = 0.25  # every ~16 steps: 15, 32, 47 ... (3 kept)
  # K = 8, the default: a dispatch ends where an event is due, whatever K.
  _poisoned_batches(monkeypatch, config, 41, 10**9)
  with pytest.raises(divergence.Diverged) as info:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert '\n' not in message
  for part in ('phase 0', 'ε=0.1', 'B=32', 'examples seen', 'update 41,'):
    assert part in message, message
  step, arrays = _state_arrays(str(tmp_path))
  assert step < 42 and f'step {step} ' in message
  assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == 'f')


def _skip_config(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.nonfinite = 'skip'  # Another program than 'stop', compiled for these tests:
  # two phases, B = 32 then 64, one micro-batch each, and one convolution.
  config.schedule.num_epochs, config.schedule.milestones = 2.0, (1.0,)
  config.model_kwargs.depth = 1
  return config


@pytest.mark.slow
def test_skip_mode_keeps_the_params_and_counts_the_skips(
  tiny_config, tmp_path, monkeypatch
):
  config = _skip_config(tiny_config)
  _poisoned_batches(monkeypatch, config, 10, 12)  # in phase 0
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['finished'] and summary['skipped_updates'] == 3
  _, arrays = _state_arrays(str(tmp_path))
  assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == 'f')
  manager = checkpoint.create_manager(str(tmp_path))
  record = manager.restore(
    manager.latest_step(), args=ocp.args.Composite(position=ocp.args.JsonRestore())
  )['position']
  manager.close()
  assert record['skipped_updates'] == 3


@pytest.mark.slow
def test_skip_mode_at_a_huge_learning_rate_saves_nothing_non_finite_and_stops(
  tiny_config, tmp_path
):
  """ε = 10⁴. Before, the update was judged by its loss and gradient only: the
  parameters overflowed and the first save was refused. Now an update that would leave
  the state non-finite is skipped too: with every skip allowed the run ends, every
  checkpoint finite; with the default fraction it stops at the first event."""
  config = _skip_config(tiny_config)
  config.schedule.learning_rate = 1e4
  config.checkpoint_every_epochs = 0.25
  config.nonfinite_max_skipped = 1.0
  summary = train.train_and_evaluate(config, str(tmp_path / 'all'))
  assert summary['finished'] and summary['skipped_updates'] > 0
  steps = [int(n) for n in os.listdir(tmp_path / 'all' / 'checkpoints') if n.isdigit()]
  assert len(steps) == 3, steps
  for step in steps:
    leaves = jax.tree.leaves(latest_state(str(tmp_path / 'all'), step)[1])
    assert all(np.isfinite(a).all() for a in leaves if a.dtype.kind == 'f'), step
  print(f'skipped {summary["skipped_updates"]} of {summary["parameter_updates"]}')

  config.nonfinite_max_skipped = 0.5
  with pytest.raises(divergence.Diverged) as info:
    train.train_and_evaluate(config, str(tmp_path / 'half'))
  message = str(info.value)
  print(message)  # pytest -s
  assert '\n' not in message and 'skipped as not finite' in message, message
  assert 'config.nonfinite_max_skipped=0.5' in message and 'ε=10000' in message
  match = re.search(r'(\d+) of the (\d+) updates', message)
  assert int(match.group(1)) > 0.5 * int(match.group(2)), message


# -------------------------------------------------------------- elastic, multi-process


def _run_main(script, workdir, num_devices, log_path):
  rc, output = _finish(_start(script, workdir, log_path, num_devices))
  assert rc == 0, output[-4000:]
  return output


@pytest.mark.slow
@pytest.mark.parametrize(('before', 'after'), [(8, 4), (4, 8)])
def test_elastic_resume_on_another_device_count(one_device_run, tmp_path, before, after):  # noqa: F811
  """Checkpointed inside phase 1 on `before` devices, resumed on `after`: the one-device
  run's result, within float tolerance (the checkpoint is replicated; the position is in
  examples; both counts split the batches with A = 1)."""
  config, expected = one_device_run
  first = config.copy_and_resolve_references()
  first.stop_after_steps = 70
  workdir = tmp_path / 'run'
  _run_main(_train_script(first, tmp_path), workdir, before, tmp_path / 'first.log')
  assert _final_state(str(workdir))[0] == 70
  (tmp_path / 'second').mkdir()
  output = _run_main(
    _train_script(config, tmp_path / 'second'), workdir, after, tmp_path / 'second.log'
  )
  assert 'Resumed at step 70' in output
  _assert_states_equal(_final_state(str(workdir)), expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(
  one_device_run,  # noqa: F811
  tmp_path,
):
  """JAX's preemption sync point: both processes save one step and exit 75; the rerun
  ends where the one-device run ends."""
  config, expected = one_device_run
  config = config.copy_and_resolve_references()
  config.steps_per_dispatch = 2
  script = _train_script(config, tmp_path)
  workdir = tmp_path / 'run'
  processes = start_processes(script, workdir, tmp_path, 'first')
  try:
    assert _wait_for(processes[1], r'Phase 0:')
    time.sleep(random.uniform(0.0, 2.0))
    processes[1].send_signal(signal.SIGTERM)
  finally:
    results = [_finish(p) for p in processes]
  codes = [rc for rc, _ in results]
  if codes != [0, 0]:  # Not past the end of training when the signal came.
    assert codes == [preemption.EXIT_PREEMPTED] * 2, results
    steps = {re.search(r'stopped at step (\d+)', out).group(1) for _, out in results}
    assert len(steps) == 1, steps
    assert _final_state(str(workdir))[0] == int(steps.pop())
  for _, output in results:
    assert 'Traceback' not in output, output[-4000:]
  rerun = start_processes(script, workdir, tmp_path, 'rerun')
  results = [_finish(p) for p in rerun]
  assert [rc for rc, _ in results] == [0, 0], results
  _assert_states_equal(_final_state(str(workdir)), expected)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize('victim', [0, 1])
def test_a_lost_peer_ends_the_survivor_with_one_line(one_device_run, tmp_path, victim):  # noqa: F811
  """kill -9 of one process mid-training, the coordinator (0) or not (1): the other
  exits 76 naming it, with no stack dump.

  Before the loops waited for each dispatch on XLA:CPU (preemption.dispatch_one_at_a_time)
  the survivor aborted in gloo (rc -6, a C++ stack dump) in most such kills. Before the
  coordination service ran beside process 0 (ibs/durability/coordinator.py), losing
  process 0 aborted the survivor in the runtime, 0.04-0.9 s after the kill.
  """
  config, _ = one_device_run
  config = config.copy_and_resolve_references()
  config.steps_per_dispatch = 1
  # Phase 1 runs to epoch 50 (~1,500 steps): the kill always lands inside training.
  config.schedule.num_epochs = 50.0
  processes = start_processes(
    _train_script(config, tmp_path),
    tmp_path / 'run',
    tmp_path,
    'k',
    IBS_PEER_TIMEOUT_S='10',  # Well inside the runtime's 100 s heartbeat timeout.
  )
  survivor = processes[1 - victim]
  killed = None
  try:
    assert _wait_for(survivor, r'Phase 0:')
    time.sleep(random.uniform(0.5, 3.0))  # Collectives under way (compiled beforehand).
    assert survivor.poll() is None, 'training ended before the kill'
    processes[victim].kill()
    killed = time.monotonic()
    rc, output = _finish(survivor)
    seconds = time.monotonic() - killed
  finally:
    for p in processes:
      if p.returncode is None:
        _finish(p)
  print(f'kill -9 of process {victim} -> survivor exit: {seconds:.1f} s')
  assert rc == preemption.EXIT_PEER_LOST, output[-4000:]
  assert output.count('lost peer') == 1, output
  assert f'lost peer process(es) {victim}' in output, output
  assert 'resumes from the last checkpoint' in output
  assert seconds < 100  # The runtime's heartbeat timeout (jax.distributed's default).
  assert 'Traceback' not in output and 'Fatal Python error' not in output, output[-4000:]


@pytest.mark.slow
def test_checkpoints_of_the_reference_are_verified(reference):
  _, workdir = reference
  steps = sorted(int(os.path.basename(d)) for d in glob.glob(f'{workdir}/checkpoints/*'))
  assert steps
  manager = checkpoint.create_manager(workdir)
  record = manager.restore(
    steps[-1], args=ocp.args.Composite(position=ocp.args.JsonRestore())
  )['position']
  manager.close()
  assert len(record['checksum']) == 16
