r"""The paper's §5.1 and §5.2 at CPU scale: MNIST-1D, a 1-D CNN, 3 seeds in minutes.

The §5.1 design scaled to N = 10,000 training examples: 100 epochs with milestones at
30/60/80 (the 60/120/160-of-200 pattern, halved), factor 5, initial batch 32 and ghost
batch 32 (the paper's 128 of 50,000 scaled to N, rounded to the ghost size).

Arguments (`--config=configs/mnist1d_study.py:schedule=hybrid,optimizer=nesterov`):
  schedule   §5.1: decaying_lr (ε 0.1 → 0.0008, B 32), hybrid (B 32 → 160, then ε
             decays), increasing_batch (B 32 → 160 → 800 → 4000, ε 0.1);
             §5.2 (B_max ≈ N/10: 1024):
             original (= decaying_lr), increasing_batch_capped, increased_lr (ε 0.5,
             B 160), increased_momentum (ε 0.5, m 0.98, B 800).
             Adam only (ibs.schedules): seesaw (B as increasing_batch, ε ÷ √5 per
             milestone), sqrt_scaling (seesaw's B and ε with the square-root rule's β2
             and ε̂; β1 kept at 0.9: the rule needs κ(1 − β1) < 1, and κ = 125).
             Beyond the paper (docs/REPRODUCTION.md, "The adaptive schedule"): adaptive
             (increasing_batch's ladder, climbed when the measured noise scale says
             so; threshold 5), adaptive_cautious (threshold 25: the next rung
             at most B_simple/5); measured_batch (decaying_lr's temperature, the batch
             the noise scale allows) and plateau (climb on a plateau of the training
             loss; ibs/measured/), both measuring on every update; two controls,
             constant (ε 0.1, B 32 throughout) and increasing_batch_early (the same
             ladder at epochs 3/6/8, 10× too soon).
  size       10k (the study's N), 20k (configs/default.py's N).
  optimizer  momentum (m 0.9), nesterov (m 0.9), sgd (ε 1.0, no momentum: same g),
             adam (ε 1e-3, β1 0.9, L2 5e-4), adamw (ε 1e-3, β1 0.9, decoupled λ 0.1:
             τ = B/(ελN) = 32 epochs at B 32).
  weight_decay  constant (λ fixed), scaled (λ per phase keeping τ constant:
             config.schedule.scale_weight_decay; needs adamw).

  python -m ibs.main --config=configs/mnist1d_study.py:schedule=hybrid --workdir=/tmp/h
  python -m experiments.reproduce --experiment=mnist1d_5_1     # the whole grid

The study grids (mnist1d_5_1, mnist1d_5_2, mnist1d_adam) are `get_grids` below.
"""

import ml_collections

from configs import default, variants

SCHEDULES = (
  'increasing_batch',
  'decaying_lr',
  'hybrid',
  'original',
  'increasing_batch_capped',
  'increased_lr',
  'increased_momentum',
  'sqrt_scaling',
  'seesaw',
  'adaptive',
  'adaptive_cautious',
  'measured_batch',
  'plateau',
  'constant',
  'increasing_batch_early',
)
OPTIMIZERS = ('momentum', 'nesterov', 'sgd', 'adam', 'adamw')
WEIGHT_DECAY = ('constant', 'scaled')
# N: 10k, the study's; 20k, configs/default.py's problem (the same trajectory fields, so
# `size=20k,schedule=increasing_batch` is the default run; tests/test_configs.py).
SIZES = ('10k', '20k')
MEASURED_STUDY = (
  'measured_batch',
  'plateau',
  'adaptive',
  'increasing_batch',
  'decaying_lr',
)
CONTROLS = ('constant', 'increasing_batch_early')


def get_grids() -> dict[str, list[str]]:
  """{experiment: config arguments} of the studies on this config.

  experiments/reproduce.py gathers them (`--experiment=mnist1d_5_1`).

  A run in two grids (the same argument) runs once and serves both.
  """
  return {
    # The paper's §5.1 design at CPU scale.
    'mnist1d_5_1': variants.grid(
      optimizer=('momentum', 'nesterov', 'sgd', 'adam'),
      schedule=('decaying_lr', 'hybrid', 'increasing_batch'),
    ),
    # §5.2; shares its decaying_lr runs with mnist1d_5_1.
    'mnist1d_5_2': variants.grid(
      optimizer=('momentum',),
      schedule=(
        'decaying_lr',
        'increasing_batch_capped',
        'increased_lr',
        'increased_momentum',
      ),
    ),
    # Optimizer-aware conversions for Adam (ibs.schedules): shares its optimizer=adam
    # decaying_lr and increasing_batch runs with mnist1d_5_1.
    'mnist1d_adam': variants.grid(
      optimizer=('adam',),
      schedule=('decaying_lr', 'increasing_batch', 'sqrt_scaling', 'seesaw'),
    )
    + variants.grid(optimizer=('adamw',), schedule=('decaying_lr', 'increasing_batch'))
    # τ = B/(ελN) held constant (scale_weight_decay), under both schedules.
    + variants.grid(
      optimizer=('adamw',),
      schedule=('increasing_batch', 'decaying_lr'),
      weight_decay=('scaled',),
    ),
    # Beyond the paper: the measured noise scale decides when B grows (ibs/adaptive.py),
    # against the fixed schedule, decaying LR and two controls (docs/REPRODUCTION.md).
    'mnist1d_adaptive': variants.grid(
      schedule=(
        'adaptive',
        'adaptive_cautious',
        'increasing_batch',
        'decaying_lr',
        'constant',
        'increasing_batch_early',
      )
    ),
    # Schedules decided by measurement (ibs/measured/): the recipe's temperature with the
    # batch the noise scale allows, and growth on a plateau of the training loss, against
    # today's adaptive kind, the fixed schedule, decaying LR and the two controls;
    # shares its runs with mnist1d_adaptive (docs/REPRODUCTION.md, "Schedules decided
    # by measurement"). Run with --seeds=0,1,2,3,4.
    'mnist1d_measured': variants.grid(schedule=MEASURED_STUDY + CONTROLS),
    # The same on configs/default.py's problem, N = 20,000.
    'mnist1d_measured_20k': variants.grid(size=('20k',), schedule=MEASURED_STUDY),
  }


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = variants.parse(
    arg,
    {
      'schedule': SCHEDULES,
      'optimizer': OPTIMIZERS,
      'weight_decay': WEIGHT_DECAY,
      'size': SIZES,
    },
  )
  config = default.get_config()
  num_train = {'10k': 10_000, '20k': 20_000}[args['size']]
  config.mnist1d.num_train = num_train
  config.gns.horizon_examples = num_train  # one epoch
  config.mnist1d.num_test = 5_000
  s = config.schedule
  s.num_epochs = 100.0
  s.milestones = (30.0, 60.0, 80.0)
  s.decay_factor = 5.0
  s.learning_rate, s.batch_size, s.momentum = 0.1, 32, 0.9
  if args['schedule'] == 'increasing_batch_early':  # a control: B grows 10× too soon
    s.milestones = (3.0, 6.0, 8.0)
  if args['schedule'] == 'adaptive_cautious':  # climb while the next rung ≤ B_simple/5
    s.adaptive.threshold = 25.0
  variants.set_schedule(
    s,
    args['schedule'].removesuffix('_early').removesuffix('_cautious'),
    hybrid_max_batch_size=160,
    capped_max_batch_size=1024,
  )
  if args['schedule'] in ('measured_batch', 'plateau'):
    config.gns.split_every = 1  # a measurement on every update: what the rule decides on
  variants.set_optimizer(config, args['optimizer'])
  if args['weight_decay'] == 'scaled':
    s.scale_weight_decay = True
  config.max_micro_batch_size = 800
  config.eval_every_epochs = 2.0
  config.checkpoint_every_epochs = 50.0
  return config
