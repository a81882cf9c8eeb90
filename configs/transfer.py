"""Transfer a pretrained VGG16 (ImageNet-style 224 px input) to a tfds dataset under a policy.

  python -m ftlab.main --workdir DIR \
    --config configs/transfer.py:dataset=oxford_flowers102,policy=last_blocks,init=PORTED_DIR

Arguments: `dataset` (tfds name), `policy` (see ftlab/policies.py), `k` (for last_blocks /
first_blocks), `init` (a checkpoint directory, e.g. written by scripts/port_weights.py),
`runlocal` (a narrow model on offline Fashion-MNIST, under a minute on a CPU).
"""

from configs import default


def get_config(arg: str | None = None):
  args = default.parse_arg(
    arg, dataset='oxford_flowers102', policy='last_blocks', k=1, init='', runlocal=False
  )
  config = default.get_config()
  config.model.name = 'vgg16'
  config.model.head = 'imagenet'  # fc1/fc2 pretrained; predictions replaced (dont_load)
  config.dataset.name = args.dataset
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 224
  config.dataset.preprocess = 'caffe'  # the Keras weights' convention; torch for torchvision
  config.dataset.augment = 'resized_crop'
  config.policy.name = args.policy
  config.policy.k = args.k
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.warmup_steps = 100
  config.batch_size = 64
  config.num_train_steps = 5000
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.init.checkpoint = args.init
  config.init.dont_load = ('predictions/.*',)  # the new task's head starts fresh
  if args.runlocal:
    config.dataset.name = 'fashion_mnist'
    config.dataset.preprocess = 'unit'
    config.dataset.augment = 'pad_crop'
    config.init.checkpoint = ''
    default.shrink(config)
  return config
