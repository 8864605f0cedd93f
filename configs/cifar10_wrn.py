r"""§5.1 and §5.2: Wide ResNet 16-4 on CIFAR-10 (docs/PAPER.md).

Ghost batch 128, L2 5e-4 (inferred), 200 epochs, milestones at epochs 60/120/160 with
factor 5. Arguments (`--config=configs/cifar10_wrn.py:schedule=hybrid,optimizer=adam`):

  schedule   §5.1: decaying_lr (ε 0.1 → 0.0008, B 128), hybrid (B 128 → 640, then ε
             decays), increasing_batch (B 128 → 640 → 3200 → 16000, ε 0.1);
             §5.2 (B_max 5120): original (= decaying_lr), increasing_batch_5120,
             increased_lr (ε 0.5, B 640), increased_momentum (ε 0.5, m 0.98, B 3200).
  optimizer  momentum (m 0.9), nesterov (m 0.9), sgd (no momentum, ε ×10 = same g),
             adam (ε 1e-3, β1 0.9).
  data       cifar10 (prepare it with
             `python -m ibs.data.prepare cifar10 --data_dir=DIR`), or fake (synthetic
             32×32×3 and a WRN-10-1, a few epochs: a CPU smoke test of the recipe).

Every phase batch must be a multiple of devices × ghost batch (128), and the paper's
batches are 128 × powers of 5 (and 5120): run them on one device, a GPU. On more, the
config check at startup names the phase batch that does not split.

  python -m ibs.main --config=configs/cifar10_wrn.py:schedule=increasing_batch \
      --workdir=/tmp/wrn_increasing_batch
  python -m ibs.calculator --config=configs/cifar10_wrn.py:schedule=hybrid --baseline
"""

import ml_collections

from configs import default, variants

SCHEDULES = (
  'increasing_batch',
  'decaying_lr',
  'hybrid',
  'original',
  'increasing_batch_5120',
  'increased_lr',
  'increased_momentum',
)
OPTIMIZERS = ('momentum', 'nesterov', 'sgd', 'adam')


def get_grids() -> dict[str, list[str]]:
  """{experiment: config arguments} of the paper's studies on this config.

  Run by experiments/reproduce.py (`--experiment=cifar10_5_1`, or `--print_commands`
  for a TPU VM); cifar10_5_2 shares its decaying_lr runs with cifar10_5_1.
  """
  return {
    'cifar10_5_1': variants.grid(
      optimizer=OPTIMIZERS, schedule=('decaying_lr', 'hybrid', 'increasing_batch')
    ),
    'cifar10_5_2': variants.grid(
      optimizer=('momentum',),
      schedule=(
        'decaying_lr',
        'increasing_batch_5120',
        'increased_lr',
        'increased_momentum',
      ),
    ),
  }


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = variants.parse(
    arg, {'schedule': SCHEDULES, 'optimizer': OPTIMIZERS, 'data': ('cifar10', 'fake')}
  )
  config = default.get_config()
  config.dataset = 'cifar10'
  config.model = 'wide_resnet'
  config.model_kwargs = ml_collections.ConfigDict(dict(depth=16, widen_factor=4))
  config.ghost_batch_size = 128
  config.half_precision = True
  config.weight_decay = 5e-4

  s = config.schedule
  s.num_epochs = 200.0
  s.milestones = (60.0, 120.0, 160.0)
  s.decay_factor = 5.0
  s.learning_rate, s.batch_size, s.momentum = 0.1, 128, 0.9
  variants.set_schedule(
    s, args['schedule'], hybrid_max_batch_size=640, capped_max_batch_size=5120
  )
  variants.set_optimizer(config, args['optimizer'])

  config.max_micro_batch_size = 1024  # per device; 16000 accumulates
  # Image batches are large: one step already outlasts the host's work per call.
  config.steps_per_dispatch = 1
  config.gns.horizon_examples = 50_000  # one epoch of CIFAR-10
  config.eval_batch_size = 1000
  config.log_every_epochs = 1.0
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 10.0

  if args['data'] == 'fake':
    config.dataset = 'fake'
    config.fake = ml_collections.ConfigDict(
      dict(num_train=2560, num_test=512, num_classes=10, shape=(32, 32, 3))
    )
    config.model_kwargs = ml_collections.ConfigDict(dict(depth=10, widen_factor=1))
    config.half_precision = False
    config.ghost_batch_size = 16
    s.num_epochs, s.milestones = 4.0, (1.0, 2.0, 3.0)
    s.batch_size = 16 * s.batch_size // 128
    if s.get('max_batch_size'):
      s.max_batch_size = 16 * s.max_batch_size // 128
    config.max_micro_batch_size = 256
    config.eval_batch_size = 256
    config.eval_every_epochs = 1.0
  return config
