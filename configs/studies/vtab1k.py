"""VTAB-1k: 19 tasks, 800 training and 200 minival images each, for machines with a network.

  python scripts/study.py --study configs/studies/vtab1k.py --workdir workdirs/vtab1k
  python scripts/study.py --study configs/studies/vtab1k.py:steps=500,seeds=1 --workdir ...

The Visual Task Adaptation Benchmark (Zhai et al. 2019, arXiv:1910.04867) as its reference
code defines it (google-research/task_adaptation, `task_adaptation/data/*.py`, HEAD d7630d3):
the tfds datasets, `train800` (the first 800 of the training split), `val200` (200 images
from the validation split, or from the end of the training split where the benchmark cuts
its own: 90%, 80% or 60% of the training split, from tfds' split sizes) and `test`; the
structured tasks' labels (`ftlab/data/labels.py`: CLEVR count and closest distance, KITTI
closest vehicle, dSprites position and orientation in 16 bins, smallNORB azimuth and
elevation). Groups natural (7), specialized (4), structured (8): the mean over tasks is the
mean of the three group means, as VTAB reports it.

Each (task, plan) chooses its rate among `learning_rates` on val200, then every seed trains
on train800 and is tested on test. tfds downloads and prepares the datasets on first use
(`dataset.download`; `data_dir=DIR` chooses where; some need a manual download, see tfds'
catalog: diabetic_retinopathy_detection, sun397, dmlab's size). Runs start from the VGG16
Keras weights of `configs/fewshot.py` (their x/255 input convention), at `image_size`
(default 224); the plans are the offline study's demo plans (linear probe, last block, LoRA on
the top blocks, full fine-tuning).

Arguments: steps (default 2500), seeds (3), image_size (224), batch (64), tasks (a
'/'-separated subset, default all), data_dir (tfds' data directory; default tfds' own,
~/tensorflow_datasets). Tested offline with `tfds.testing.mock_data`
(tests/test_vtab.py); never run here (no network).
"""

import ml_collections

from configs import default
from configs.studies import offline

# Split sizes in tfds (the counts the benchmark's percentages cut): see each task below.
CALTECH101_TRAIN, CIFAR100_TRAIN, PETS_TRAIN, SVHN_TRAIN = 3060, 50000, 3680, 73257
EUROSAT_TRAIN, RESISC45_TRAIN, CLEVR_TRAIN, DSPRITES_TRAIN = 27000, 31500, 70000, 737280


def _tail(percent: int, total: int) -> str:
  """val200 after the first `percent` of a training split of `total` examples."""
  start = percent * total // 100
  return f'train[{start}:{start + 200}]'


def _val(split: str = 'validation') -> str:
  return f'{split}[:200]'


def _cut(train_percent: int, test_percent: int, total: int) -> tuple[str, str]:
  """val200 and test of a dataset with one tfds split of `total` examples, cut by percent."""
  return _tail(train_percent, total), f'train[{test_percent * total // 100}:]'


# name -> (tfds name, val200, test, label, group)
TASKS = {
  'caltech101': ('caltech101', _tail(90, CALTECH101_TRAIN), 'test', '', 'natural'),
  'cifar100': ('cifar100', _tail(90, CIFAR100_TRAIN), 'test', '', 'natural'),
  'dtd': ('dtd', _val(), 'test', '', 'natural'),
  'flowers102': ('oxford_flowers102', _val(), 'test', '', 'natural'),
  'pets': ('oxford_iiit_pet', _tail(80, PETS_TRAIN), 'test', '', 'natural'),
  'svhn': ('svhn_cropped', _tail(90, SVHN_TRAIN), 'test', '', 'natural'),
  'sun397': ('sun397/tfds', _val(), 'test', '', 'natural'),
  'camelyon': ('patch_camelyon', _val(), 'test', '', 'specialized'),
  # EuroSAT and RESISC45 have one tfds split, cut 60% / 20% / 20% (train / val / test).
  'eurosat': ('eurosat/rgb', *_cut(60, 80, EUROSAT_TRAIN), '', 'specialized'),
  'resisc45': ('resisc45', *_cut(60, 80, RESISC45_TRAIN), '', 'specialized'),
  'retinopathy': (
    'diabetic_retinopathy_detection/btgraham-300',
    _val(),
    'test',
    '',
    'specialized',
  ),
  # CLEVR's test labels are not public: its validation split is the benchmark's test.
  'clevr_count': ('clevr', _tail(90, CLEVR_TRAIN), 'validation', 'clevr_count', 'structured'),
  'clevr_distance': (
    'clevr',
    _tail(90, CLEVR_TRAIN),
    'validation',
    'clevr_distance',
    'structured',
  ),
  'dmlab': ('dmlab', _val(), 'test', '', 'structured'),
  'kitti_distance': ('kitti', _val(), 'test', 'kitti_distance', 'structured'),
  # dSprites has one tfds split, cut 80% / 10% / 10%.
  'dsprites_location': (
    'dsprites',
    *_cut(80, 90, DSPRITES_TRAIN),
    'bins:label_x_position:16',
    'structured',
  ),
  'dsprites_orientation': (
    'dsprites',
    *_cut(80, 90, DSPRITES_TRAIN),
    'bins:label_orientation:16',
    'structured',
  ),
  # smallNORB: val200 from the first half of its test split, test the second half.
  'smallnorb_azimuth': (
    'smallnorb',
    _val('test'),
    'test[50%:]',
    'key:label_azimuth',
    'structured',
  ),
  'smallnorb_elevation': (
    'smallnorb',
    _val('test'),
    'test[50%:]',
    'key:label_elevation',
    'structured',
  ),
}
# The classes of each task, as the benchmark has them (checked against the tfds features).
NUM_CLASSES = {
  'caltech101': 102,
  'cifar100': 100,
  'dtd': 47,
  'flowers102': 102,
  'pets': 37,
  'svhn': 10,
  'sun397': 397,
  'camelyon': 2,
  'eurosat': 10,
  'resisc45': 45,
  'retinopathy': 5,
  'clevr_count': 8,
  'clevr_distance': 6,
  'dmlab': 6,
  'kitti_distance': 4,
  'dsprites_location': 16,
  'dsprites_orientation': 16,
  'smallnorb_azimuth': 18,
  'smallnorb_elevation': 9,
}


def get_config(arg=None):
  args = default.parse_arg(
    arg, steps=2500, seeds=3, image_size=224, batch=64, tasks='', data_dir=''
  )
  names = [t for t in args.tasks.split('/') if t] or list(TASKS)
  unknown = [t for t in names if t not in TASKS]
  if unknown:
    raise ValueError(f'vtab1k tasks {unknown} are not VTAB-1k tasks; valid: {"/".join(TASKS)}')
  study = ml_collections.ConfigDict()
  study.base = 'configs/fewshot.py'
  study.overrides = (
    ('num_train_steps', args.steps),
    ('batch_size', args.batch),
    ('eval_every_steps', args.steps),
    ('dataset.image_size', args.image_size),
    ('dataset.download', True),
    ('dataset.examples_per_class', 0),  # all of train800
    ('record_step_flops', True),  # FLOPs and step memory for the cost columns
  )
  if args.data_dir:  # where tfds keeps (or downloads and prepares) the datasets
    study.overrides += (('dataset.data_dir', args.data_dir),)
  study.tasks = {
    name: {
      'overrides': (
        ('dataset.name', TASKS[name][0]),
        ('dataset.train_split', 'train[:800]'),
        ('dataset.eval_split', TASKS[name][2]),
        ('dataset.label', TASKS[name][3]),
      ),
      'minival': TASKS[name][1],
      'group': TASKS[name][4],
    }
    for name in names
  }
  study.plans = {name: offline.plan_entry(name, select=True) for name in offline.DEMO_PLANS}
  study.seeds = tuple(range(args.seeds))
  study.learning_rates = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
  study.minival = ''
  study.baseline = 'full'
  return study
