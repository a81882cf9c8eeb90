"""Each tuner peft implements on `Conv2d` and `Linear` (LoRA, DoRA, (IA)^3, OFT, LoHa, LoKr)
against peft's torch module holding the same adapter values: the merged kernel and the layer's
output agree at rel 1e-5 (peft 0.21, `torch` CPU wheel; both only on Python 3.11, see
setup.cfg). SSF, which peft lacks, is checked against its closed form in test_tuners.py."""

import warnings

import jax
import numpy as np
import pytest
from jax import lax

from ftlab.plans import registry, tuners
from ftlab.plans.methods import lokr
from tests import fakes

torch = pytest.importorskip('torch', reason=fakes.NO_TORCH)
peft = pytest.importorskip('peft', reason='peft is installed with torch (Python 3.11 only)')

CIN, COUT, IN, OUT = 16, 32, 12, 10  # LoKr's W2 is low rank at r = 2 on both (r < max(b, d) / 2)


def tconv(kernel):
  """Our conv kernel `[k, k, Cin, Cout]` as torch's weight `[Cout, Cin, k, k]`."""
  return np.asarray(kernel).transpose(3, 2, 0, 1)


def flat_in(factor):
  """Our D-side factor `[k, k, Cin, r]` as peft's `[r, Cin * k * k]` (torch's row order)."""
  return tconv(factor).reshape(factor.shape[-1], -1)


# ours -> {peft parameter name: value} for one layer; `conv` says which layout.
TO_PEFT = {
  'lora': lambda x, conv: {
    'lora_A.default.weight': tconv(x['lora_a']) if conv else x['lora_a'].T,
    'lora_B.default.weight': x['lora_b'].T[:, :, None, None] if conv else x['lora_b'].T,
  },
  'dora': lambda x, conv: {
    'lora_A.default.weight': tconv(x['dora_a']) if conv else x['dora_a'].T,
    'lora_B.default.weight': x['dora_b'].T[:, :, None, None] if conv else x['dora_b'].T,
    # peft stores the magnitude m itself: the loaded norms plus our dm.
    'lora_magnitude_vector.default.weight': (
      np.sqrt(
        (np.asarray(x['kernel'], np.float64) ** 2).sum(axis=tuple(range(x['kernel'].ndim - 1)))
      )
      + x['dora_dm']
    ).reshape((1, -1, 1, 1) if conv else (-1,)),
  },
  'ia3': lambda x, conv: {
    'ia3_l.default': x['ia3_scale'].reshape((1, -1, 1, 1) if conv else (-1, 1))
  },
  'oft': lambda x, conv: {'oft_R.default.weight': x['oft_q']},
  'loha': lambda x, conv: {
    'hada_w1_a.default': x['loha_b1'].T,
    'hada_w1_b.default': flat_in(x['loha_a1']) if conv else x['loha_a1'].T,
    'hada_w2_a.default': x['loha_b2'].T,
    'hada_w2_b.default': flat_in(x['loha_a2']) if conv else x['loha_a2'].T,
  },
  'lokr': lambda x, conv: {
    'lokr_w1.default': x['lokr_w1'].T,
    'lokr_w2_a.default': x['lokr_v'].T,
    'lokr_w2_b.default': flat_in(x['lokr_u']) if conv else x['lokr_u'].T,
  },
}
CALLS = {
  'lora': (
    registry.Call('lora', (('rank', 2), ('alpha', 6.0))),
    lambda: peft.LoraConfig(r=2, lora_alpha=6),
  ),
  'dora': (
    registry.Call('dora', (('rank', 2), ('alpha', 6.0))),
    lambda: peft.LoraConfig(r=2, lora_alpha=6, use_dora=True),
  ),
  'ia3': (registry.Call('ia3'), lambda: peft.IA3Config(feedforward_modules=[])),
  'oft': (
    registry.Call('oft', (('block_size', 8),)),
    lambda: peft.OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False),
  ),
  'loha': (
    registry.Call('loha', (('rank', 2), ('alpha', 6.0))),
    lambda: peft.LoHaConfig(r=2, alpha=6),
  ),
  'lokr': (
    registry.Call('lokr', (('rank', 2), ('alpha', 6.0))),
    lambda: peft.LoKrConfig(r=2, alpha=6),
  ),
}


class Net(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(CIN, COUT, 3, padding=1)
    self.fc = torch.nn.Linear(IN, OUT)


def adapted_layers(name, seed=0):
  """Our two layers with `name`'s adapters, every trained adapter leaf drawn at random (so that
  no factor is at its zero start)."""
  rng = np.random.RandomState(seed)
  params = {
    'conv': {
      'kernel': rng.normal(size=(3, 3, CIN, COUT)).astype(np.float32) * 0.1,
      'bias': rng.normal(size=COUT).astype(np.float32) * 0.1,
    },
    'fc': {
      'kernel': rng.normal(size=(IN, OUT)).astype(np.float32) * 0.3,
      'bias': rng.normal(size=OUT).astype(np.float32) * 0.1,
    },
  }
  tuner = tuners.all_tuners()[name]
  call, _ = CALLS[name]
  params = jax.device_get(tuners.attach(params, ['conv', 'fc'], tuner, call, jax.random.key(seed)))
  for layer in params.values():
    for leaf in tuner.trained:
      scale = 0.05 if leaf in ('oft_q', 'dora_dm') else 0.3
      layer[leaf] = (1.0 if leaf == 'ia3_scale' else 0.0) + scale * rng.normal(
        size=layer[leaf].shape
      ).astype(np.float32)
  return params


def peft_model(name, ours):
  net = Net()
  with torch.no_grad():
    net.conv.weight.copy_(torch.from_numpy(tconv(ours['conv']['kernel']).copy()))
    net.conv.bias.copy_(torch.from_numpy(ours['conv']['bias']))
    net.fc.weight.copy_(torch.from_numpy(ours['fc']['kernel'].T.copy()))
    net.fc.bias.copy_(torch.from_numpy(ours['fc']['bias']))
  config = CALLS[name][1]()
  config.target_modules = ['conv', 'fc']
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # peft's notes on unusual target modules
    model = peft.get_peft_model(net, config)
  found = dict(model.named_parameters())
  with torch.no_grad():
    for layer, conv in (('conv', True), ('fc', False)):
      for key, value in TO_PEFT[name](ours[layer], conv).items():
        target = found[f'base_model.model.{layer}.{key}']
        value = np.asarray(value, np.float32)
        assert target.shape == value.shape, (layer, key, target.shape, value.shape)
        target.copy_(torch.from_numpy(value.copy()))
  return model


def conv_nhwc(x, kernel):
  return lax.conv_general_dilated(
    x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def close(got, expected):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize('name', list(CALLS))
def test_fold_and_output_equal_pefts(name):
  ours = adapted_layers(name)
  folded = jax.device_get(tuners.merge(ours))
  model = peft_model(name, ours)
  rng = np.random.RandomState(1)
  x_img = rng.normal(size=(2, 9, 9, CIN)).astype(np.float32)
  x_vec = rng.normal(size=(5, IN)).astype(np.float32)
  ours_img = np.asarray(conv_nhwc(x_img, folded['conv']['kernel'])) + folded['conv']['bias']
  ours_vec = x_vec @ folded['fc']['kernel'] + folded['fc']['bias']
  inner = model.base_model.model
  with torch.no_grad():
    # peft's own forward, adapters unmerged (OFT's Conv2d forward excepted, below).
    vec = inner.fc(torch.from_numpy(x_vec)).numpy()
    img = inner.conv(torch.from_numpy(x_img.transpose(0, 3, 1, 2).copy())).numpy()
    merged = model.merge_and_unload()
  close(ours_vec, vec)
  if name != 'oft':
    # peft's unmerged OFT Conv2d rotates the unfolded input patches and folds them back by
    # summing overlaps, which is not its merged layer (nor the paper's R W): see the next lines.
    close(ours_img, img.transpose(0, 2, 3, 1))
  close(folded['conv']['kernel'], merged.conv.weight.detach().numpy().transpose(2, 3, 1, 0))
  close(folded['conv']['bias'], merged.conv.bias.detach().numpy())
  close(folded['fc']['kernel'], merged.fc.weight.detach().numpy().T)
  close(folded['fc']['bias'], merged.fc.bias.detach().numpy())
  with torch.no_grad():
    merged_img = merged.conv(torch.from_numpy(x_img.transpose(0, 3, 1, 2).copy())).numpy()
  close(ours_img, merged_img.transpose(0, 2, 3, 1))


@pytest.mark.parametrize('name', ['dora', 'loha', 'lokr'])
def test_adapter_gradients_equal_pefts(name):
  """The gradient reaching the adapters through the fold is peft's (DoRA: with the norm held
  constant, as peft and the paper do)."""
  ours = adapted_layers(name, seed=3)
  model = peft_model(name, ours)
  rng = np.random.RandomState(4)
  x_vec = rng.normal(size=(5, IN)).astype(np.float32)
  g = rng.normal(size=(5, OUT)).astype(np.float32)
  trained = tuners.all_tuners()[name].trained

  def loss(adapters):
    layer = {**ours['fc'], **adapters}
    folded = tuners.fold({'fc': layer})['fc']
    return ((x_vec @ folded['kernel'] + folded['bias']) * g).sum()

  grads = jax.grad(loss)({leaf: ours['fc'][leaf] for leaf in trained})
  out = model.base_model.model.fc(torch.from_numpy(x_vec))
  (out * torch.from_numpy(g)).sum().backward()
  found = dict(model.named_parameters())
  mapped = TO_PEFT[name]({**ours['fc'], **{k: np.asarray(v) for k, v in grads.items()}}, False)
  for key, value in mapped.items():
    if key.startswith('lora_magnitude'):
      value = np.asarray(grads['dora_dm'])  # d loss / d m = d loss / d dm
    close(value, found[f'base_model.model.fc.{key}'].grad.numpy())


def test_lokr_factorization_is_pefts():
  from peft.tuners.lokr.layer import factorization

  for dim in (1, 3, 12, 27, 64, 100, 127, 128, 256, 512, 4608):
    for factor in (-1, 2, 3, 4, 8, 16):
      assert lokr.factorization(dim, factor) == factorization(dim, factor), (dim, factor)
