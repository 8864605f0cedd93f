"""One run per workdir: a second run is refused, naming the holder; kill -9 frees it."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ibs.durability import lock

HOLD = textwrap.dedent(
  """
  import sys, time
  from ibs.durability import lock
  lock.WorkdirLock(sys.argv[1]).acquire()
  print('locked', flush=True)
  time.sleep(600)
  """
)


def _holder(workdir):
  process = subprocess.Popen(
    [sys.executable, '-c', HOLD, str(workdir)], stdout=subprocess.PIPE, text=True
  )
  assert process.stdout.readline().strip() == 'locked'
  return process


def test_second_process_is_refused_naming_the_holder(tmp_path):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(lock.WorkdirLocked, match=f'pid {holder.pid} on host ') as info:
      lock.WorkdirLock(str(tmp_path)).acquire()
    assert '\n' not in str(info.value)
  finally:
    holder.kill()
    holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = _holder(tmp_path)
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  with lock.WorkdirLock(str(tmp_path)):  # The OS released it with the process.
    assert (tmp_path / lock.LOCK_FILE).read_text().startswith(f'pid {os.getpid()} ')
  with lock.WorkdirLock(str(tmp_path)):  # Released on exit: taken again.
    pass
