"""Test set-up: 8 simulated CPU devices (before jax is imported) and the golden fixture."""

import os

# The tests' own process compiles XLA:CPU code at LLVM's lowest optimisation level: its steps are small and
# mostly one-off, so they compile far longer than they run. The main command's processes that tests start
# (tests/test_run.py `main`) set XLA_FLAGS of their own: they run hundreds of steps of one cached program.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_enable_concurrency_optimized_scheduler=false'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from e2vpt_jax import checkpoints, optim  # noqa: E402
from e2vpt_jax.models import vit  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / 'golden'


@pytest.fixture(scope='session')
def golden() -> dict[str, np.ndarray]:
  with np.load(GOLDEN / 'e2vpt_tiny.npz') as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='session')
def golden_meta() -> dict:
  return json.loads((GOLDEN / 'e2vpt_tiny.json').read_text())


def golden_backbone_arrays(golden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The fixture's backbone under its Google (pre-Linen) names."""
  return {k.removeprefix('backbone/'): v for k, v in golden.items() if k.startswith('backbone/')}


def golden_adapter_arrays(golden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in golden.items() if k.split('/')[0] in checkpoints.ADAPTER_GROUPS}


@pytest.fixture(scope='session')
def golden_model(golden_meta) -> vit.ViT:
  c = golden_meta['config']
  return vit.ViT(num_classes=c['num_classes'], patch_size=c['patch_size'], width=c['hidden_size'],
                 depth=c['depth'], num_heads=c['num_heads'], mlp_dim=c['mlp_dim'],
                 num_prompts=c['num_prompt_tokens_P'], num_kv_prompts=c['num_kv_tokens_L'], use_masks=True)


@pytest.fixture(scope='session')
def golden_params(golden) -> dict:
  return optim.combine(checkpoints.google_vit_params(golden_backbone_arrays(golden)),
                       checkpoints.unflatten(golden_adapter_arrays(golden)))


def assert_close(actual, expected, rtol: float = 1e-5) -> float:
  """Max |actual − expected| ≤ rtol · max |expected| (the fixture's definition); returns that ratio."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  ratio = float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
  assert ratio <= rtol, f'max error {ratio:.3g} of the largest magnitude exceeds {rtol}'
  return ratio


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache for this process and every process the tests start: their runs
  compile the same steps again and again."""
  import jax
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  settings = {'jax_compilation_cache_dir': cache, 'jax_persistent_cache_min_compile_time_secs': 0,
              'jax_persistent_cache_min_entry_size_bytes': 0}
  for name, value in settings.items():
    jax.config.update(name, value)
  with pytest.MonkeyPatch.context() as env:
    for name, value in settings.items():
      env.setenv(name.upper(), str(value))
    yield


@pytest.fixture(scope='session')
def reference_run(tmp_path_factory) -> pathlib.Path:
  """The TINY run of tests/test_run.py, uninterrupted: what every resumed or repaired run must equal."""
  from tests.test_run import main
  workdir = tmp_path_factory.mktemp('reference')
  code, _, err = main(workdir)
  assert code == 0, err
  return workdir
