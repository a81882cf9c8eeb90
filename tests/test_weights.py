"""Named weights against a loopback HTTP server: a good file (ported once, then a cache hit
with no server), a checksum that does not match, an interrupted transfer, offline with a file
placed by hand, the hub's sha256 behind a redirect, one download for concurrent fetches; and
the config side: `auto` preprocessing, a mismatch refused, transfer.py's explicit scratch."""

# ruff: noqa: E402 (the imports below need torch, which this module asks for first)

import pytest

from tests import fakes

torch = pytest.importorskip('torch', reason=fakes.NO_TORCH)

import contextlib
import hashlib
import http.server
import json
import os
import threading

import numpy as np
import porting_refs as refs

from configs import transfer
from ftlab import init_from
from ftlab.porting import weights
from tests.test_porting import NARROW, assert_matches, ftlab_output, images


class Server:
  """Serves `files[path] = bytes` on 127.0.0.1; `cut[path] = n` sends only n bytes of a full
  Content-Length; `etag[path]` is sent as X-Linked-Etag; `redirect[path]` answers 302."""

  def __init__(self):
    self.files, self.cut, self.etag, self.redirect, self.hits = {}, {}, {}, {}, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        server.hits.append(self.path)
        if self.path in server.redirect:
          self.send_response(302)
          self.send_header('Location', server.redirect[self.path])
          if self.path in server.etag:
            self.send_header('X-Linked-Etag', f'"{server.etag[self.path]}"')
          self.end_headers()
          return
        data = server.files.get(self.path)
        if data is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data[: server.cut.get(self.path, len(data))])

      def log_message(self, *args):
        del args

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  found = Server()
  yield found
  with contextlib.suppress(Exception):
    found.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('FTLAB_CACHE', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


@pytest.fixture(scope='module')
def vgg11_file(tmp_path_factory):
  """A narrow torchvision-layout VGG11 as torch.save writes it, its bytes and torch itself."""
  net = refs.randomize_torch(refs.TorchVisionVGG(11, False, num_classes=10, width=NARROW))
  path = tmp_path_factory.mktemp('weights') / 'vgg11.pth'
  torch.save(net.state_dict(), path)
  return net, path.read_bytes()


def register(monkeypatch, name, url, checksum, fmt='torchvision', **kw):
  entry = weights.Weights(name, url, checksum, fmt, 'a test file', **kw)
  monkeypatch.setitem(weights.REGISTRY, name, entry)
  return entry


def sha256(data):
  return hashlib.sha256(data).hexdigest()


def test_good_file_is_verified_ported_once_and_then_read_offline(
  server, cache, monkeypatch, vgg11_file, capsys
):
  net, data = vgg11_file
  server.files['/vgg11-abc.pth'] = data
  entry = register(
    monkeypatch, 'torchvision:test11', f'{server.url}/vgg11-abc.pth', f'sha256:{sha256(data)[:8]}'
  )
  directory, record = weights.resolve(entry.name)
  assert server.hits == ['/vgg11-abc.pth']
  assert record['weights']['checksum'] == f'sha256:{sha256(data)}'
  assert record['weights']['url'] == entry.url and record['preprocessing']['name'] == 'torch'
  assert 'B/s' in capsys.readouterr().err  # tqdm's progress: bytes, rate, ETA
  assert (cache / 'downloads' / 'vgg11-abc.pth').read_bytes() == data
  assert not list((cache / 'downloads').glob('*.part'))
  # The port reproduces torch; a second resolve (no server) neither downloads nor ports.
  from ftlab import porting

  ported = porting.read(cache / 'downloads' / 'vgg11-abc.pth')
  assert_matches(ftlab_output(ported, images(64)), refs.torch_logits(net, images(64)))
  server.stop()
  mtime = os.path.getmtime(os.path.join(directory, 'port.json'))
  again, record_again = weights.resolve(entry.name)
  assert (again, record_again) == (directory, record)
  assert os.path.getmtime(os.path.join(directory, 'port.json')) == mtime


def test_checksum_mismatch_keeps_nothing(server, cache, monkeypatch, vgg11_file):
  _, data = vgg11_file
  server.files['/vgg11-bad.pth'] = data
  register(monkeypatch, 'torchvision:bad', f'{server.url}/vgg11-bad.pth', 'sha256:00000000')
  with pytest.raises(weights.WeightsError) as e:
    weights.fetch('torchvision:bad')
  assert f'has sha256 {sha256(data)}, the publisher says 00000000' in str(e.value)
  assert sorted(os.listdir(cache / 'downloads')) == ['vgg11-bad.pth.lock']  # no file, no .part


def test_interrupted_transfer_is_never_used_and_the_next_run_starts_clean(
  server, cache, monkeypatch, vgg11_file
):
  _, data = vgg11_file
  server.files['/vgg11-cut.pth'] = data
  server.cut['/vgg11-cut.pth'] = len(data) // 3
  register(
    monkeypatch, 'torchvision:cut', f'{server.url}/vgg11-cut.pth', f'sha256:{sha256(data)[:8]}'
  )
  with pytest.raises(weights.WeightsError, match=rf'stopped at [\d,]+ of {len(data):,} bytes'):
    weights.fetch('torchvision:cut')
  assert sorted(os.listdir(cache / 'downloads')) == ['vgg11-cut.pth.lock']
  del server.cut['/vgg11-cut.pth']  # the network is back
  path, record = weights.fetch('torchvision:cut')
  assert open(path, 'rb').read() == data and record == f'sha256:{sha256(data)}'


def test_offline_names_the_url_and_the_path_a_manual_download_is_picked_up_from(
  cache, monkeypatch, vgg11_file
):
  _, data = vgg11_file
  with contextlib.closing(__import__('socket').socket()) as s:  # a port nobody listens on
    s.bind(('127.0.0.1', 0))
    url = f'http://127.0.0.1:{s.getsockname()[1]}/vgg11.h5'
  register(monkeypatch, 'keras:offline', url, f'md5:{hashlib.md5(data).hexdigest()}')
  with pytest.raises(weights.WeightsError) as e:
    weights.fetch('keras:offline')
  message = str(e.value)
  expected = cache / 'downloads' / 'vgg11.h5'
  assert message.startswith(f'cannot download keras:offline from {url} (')
  assert message.endswith(f'save it as {expected}, then run again') and '\n' not in message
  expected.write_bytes(data)  # downloaded by hand: verified (md5, as Keras publishes) and used
  assert weights.fetch('keras:offline') == (str(expected), f'md5:{hashlib.md5(data).hexdigest()}')
  expected.write_bytes(data[:-1])
  os.remove(str(expected) + '.verified')
  with pytest.raises(weights.WeightsError, match='a corrupt or other file'):
    weights.fetch('keras:offline')


def test_hub_sha256_comes_with_the_redirect(server, cache, monkeypatch, vgg11_file):
  _, data = vgg11_file
  server.files['/cdn/model.safetensors'] = data
  server.redirect['/timm/model.safetensors'] = f'{server.url}/cdn/model.safetensors'
  server.etag['/timm/model.safetensors'] = sha256(data)
  register(
    monkeypatch, 'timm:test', f'{server.url}/timm/model.safetensors', 'etag', filename='t.st'
  )
  assert weights.fetch('timm:test')[1] == f'sha256:{sha256(data)}'
  server.etag['/timm/model.safetensors'] = '0' * 64  # a hub that says another file
  register(monkeypatch, 'timm:other', f'{server.url}/timm/model.safetensors', 'etag')
  with pytest.raises(weights.WeightsError, match='the publisher says 0000'):
    weights.fetch('timm:other')


def test_concurrent_fetches_download_once(server, cache, monkeypatch, vgg11_file):
  _, data = vgg11_file
  server.files['/vgg11-once.pth'] = data
  register(
    monkeypatch, 'torchvision:once', f'{server.url}/vgg11-once.pth', f'sha256:{sha256(data)[:8]}'
  )
  results = []
  threads = [
    threading.Thread(target=lambda: results.append(weights.fetch('torchvision:once')))
    for _ in range(4)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert server.hits == ['/vgg11-once.pth'] and len(set(results)) == 1


def test_unknown_name_and_the_list(capsys):
  with pytest.raises(weights.WeightsError, match=r"unknown weights 'keras:vgg61'; did you mean"):
    weights.lookup('keras:vgg61')
  assert weights.lookup('timm:vgg16').name == 'timm:vgg16.tv_in1k'
  assert weights.main(['list']) == 0
  listed = capsys.readouterr().out
  for name in ('keras:vgg16_notop', 'torchvision:vgg19_bn', 'timm:vgg11.tv_in1k'):
    assert name in listed
  assert weights.lookup('torchvision:vgg16').url.endswith('/vgg16-397923af.pth')
  assert weights.lookup('keras:vgg16').checksum == 'md5:64373286793e3c8b2b4e3219cbf3544b'


def test_preprocessing_auto_and_a_mismatch_refused():
  found = init_from.Source('x', '/x', {'preprocessing': {'name': 'torch'}})
  assert init_from.preprocessing('auto', found) == 'torch'
  assert init_from.preprocessing('torch', found) == 'torch'
  with pytest.raises(init_from.InitError, match=r"trained on torch inputs .* is 'caffe'"):
    init_from.preprocessing('caffe', found)
  guessed = init_from.Source('x', '/x', {'preprocessing': {'name': 'unit', 'guess': 'NHWC'}})
  assert init_from.preprocessing('caffe', guessed) == 'caffe'  # a guess gives way
  with pytest.raises(init_from.InitError, match='records none'):
    init_from.preprocessing('auto', init_from.Source(''))


def test_transfer_config_wants_weights_or_an_explicit_scratch():
  with pytest.raises(ValueError, match=r'give init= named weights \(e.g. init=keras:vgg16'):
    transfer.get_config('dataset=cifar10')
  scratch = transfer.get_config('init=scratch')
  assert scratch.init.checkpoint == 'scratch' and scratch.dataset.preprocess == 'unit'
  named = transfer.get_config('init=torchvision:vgg16_bn,model=vgg16_bn')
  assert named.dataset.preprocess == 'auto' and named.model.name == 'vgg16_bn'


@pytest.mark.slow  # a run
def test_named_weights_run_records_them_and_keeps_a_fresh_head(
  server, cache, monkeypatch, vgg11_file, tmp_path
):
  from configs import default
  from ftlab import loop

  _, data = vgg11_file
  server.files['/vgg11-run.pth'] = data
  register(
    monkeypatch, 'torchvision:run', f'{server.url}/vgg11-run.pth', f'sha256:{sha256(data)[:8]}'
  )
  config = default.get_config('runlocal')
  config.model.name, config.model.head, config.model.adaptive_pool = 'vgg11', 'imagenet', 7
  config.dataset.classes = (0, 1, 2)  # another class count than the weights' 10
  config.dataset.preprocess = 'auto'
  config.init.checkpoint = 'torchvision:run'
  config.num_train_steps = 2
  config.dataset.eval_split = 'test[:32]'
  summary = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  init = summary['init']
  assert init['weights']['name'] == 'torchvision:run' and init['preprocessing'] == 'torch'
  assert init['weights']['checksum'] == f'sha256:{sha256(data)}'
  assert init['weights']['url'] == f'{server.url}/vgg11-run.pth'
  data_record = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert data_record['dataset']['preprocess'] == 'auto'
  assert np.isfinite(summary['final_eval_loss'])
