"""Benchmarks: `python -m e2vpt_jax.bench --what=train|eval|runs|init|task|input|prune_flops` (rows for BENCHMARKS.md).

FLOPs are XLA's cost analysis of the compiled step (2 FLOPs per multiply-add, forward and backward
as compiled); MFU divides the achieved FLOP/s by the devices' dense bf16 peak, for float32 rows too.
"""

import dataclasses
import functools
import os
import resource
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from e2vpt_jax import checkpoints, optim, parallel, train
from e2vpt_jax import config as config_lib
from e2vpt_jax import run
from e2vpt_jax.models import backbones, vit
from e2vpt_jax.data import input as data_input

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's flags, defined only when it runs as the program: importing bench (main does) adds none."""
  flags.DEFINE_enum('what', 'train', ['train', 'eval', 'runs', 'init', 'task', 'input', 'prune_flops'],
                    'what to measure')
  flags.DEFINE_string('variant', 'B/16', 'model variant: a ViT preset (tiny for a quick check), swin-B, mae-B/16, …')
  flags.DEFINE_integer('image_size', 224, 'image side in pixels')
  flags.DEFINE_list('batch_sizes', ['8'], 'global batch sizes to measure')
  flags.DEFINE_list('dtypes', ['float32'], 'compute dtypes: float32, bfloat16')
  flags.DEFINE_list('transfers', ['e2vpt', 'full'], 'e2vpt (P = 10, L = 5), vpt, linear, full')
  flags.DEFINE_string('remat', '', "block rematerialisation: '', 'auto', 'dots' or 'full'")
  flags.DEFINE_integer('steps', 3, 'timed steps after one warm-up step')
  flags.DEFINE_integer('task_epochs', 100, 'epochs of the one-task run (--what=task)')
  flags.DEFINE_integer('test_images', 10000, 'evaluation images of the one-task run')
  flags.DEFINE_float('peak_tflops', 0, 'dense bf16 peak of one device; 0: from its kind')
  flags.DEFINE_integer('batch_size', 64, 'global batch size (VTAB: 64)')
  flags.DEFINE_integer('epochs', 5, 'timed epochs, after one warm-up epoch')
  flags.DEFINE_list('runs', ['1', '2', '4', '8', '16'], 'runs per step to measure (--what=runs)')
  flags.DEFINE_integer('sweep_runs', 8, 'runs of the timed sweep (--what=runs; 0: none)')
  flags.DEFINE_integer('sweep_epochs', 10, 'epochs of each run of the timed sweep')


def _images_per_second(data: data_input.InMemory, normalized: bool) -> float:
  """Images/s of `train_batches` over whole epochs, each batch dropped once placed (as a train loop does)."""
  mesh = parallel.make_mesh()

  def run(epoch: int) -> None:
    for batch in data_input.train_batches(data, FLAGS.batch_size, seed=0, epoch=epoch, mesh=mesh,
                                          normalized=normalized):
      pass
    jax.block_until_ready(batch)

  run(0)
  start = time.perf_counter()
  for epoch in range(1, FLAGS.epochs + 1):
    run(epoch)
  return FLAGS.epochs * len(data.labels) / (time.perf_counter() - start)


def bench_input() -> None:
  """The in-memory VTAB training set (1,000 uint8 images at 224 × 224): host pipeline, then with normalisation."""
  rng = np.random.default_rng(0)
  data = data_input.InMemory(rng.integers(0, 256, (1000, 224, 224, 3), dtype=np.uint8),
                             rng.integers(0, 100, 1000, dtype=np.int32))
  devices = f'{jax.device_count()} × {jax.devices()[0].device_kind}'
  print(f'input host (uint8 batches placed on {devices}), batch {FLAGS.batch_size}: '
        f'{_images_per_second(data, normalized=False):,.0f} images/s')
  print(f'input with normalisation on {devices}, batch {FLAGS.batch_size}: '
        f'{_images_per_second(data, normalized=True):,.0f} images/s')


def forward_flops(model: vit.ViT, image_size: int = 224) -> float:
  """FLOPs of one image's eval forward as XLA's cost analysis counts them (2 per multiply-add)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)
  return jax.jit(model.apply).lower(params, images).compile().cost_analysis()['flops']


def bench_prune_flops() -> None:
  """ViT-B/16 E²VPT (L = 5) inference FLOPs by prompt tokens kept: drop mode removes pruned tokens."""
  plain = forward_flops(vit.get_model('B/16', num_classes=100))
  print(f'plain ViT-B/16: {plain / 1e9:.2f} GFLOPs per image')
  for kept in (10, 8, 5, 2):
    flops = forward_flops(vit.get_model('B/16', num_classes=100, num_prompts=kept, num_kv_prompts=5, use_masks=True))
    print(f'P = 10, {10 - kept} pruned tokens dropped ({kept} kept), L = 5: {flops / 1e9:.2f} GFLOPs per image '
          f'({flops / plain:.3f} × plain)')


PEAK_TFLOPS = {'H100': 989.4, 'H200': 989.4, 'A100': 312.0, 'TPU v4': 275.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0}


@dataclasses.dataclass(frozen=True)
class Setup:
  """One measured configuration."""
  variant: str = 'B/16'
  image_size: int = 224
  batch_size: int = 8
  dtype: str = 'float32'
  transfer: str = 'e2vpt'
  remat: str = ''


def peak_tflops(per_device: float = 0) -> float | None:
  """Dense bf16 peak of all devices, from `per_device` or the device kind (None when unknown: CPU)."""
  kind = jax.devices()[0].device_kind
  one = per_device or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
  return one and one * jax.device_count()


def peak_memory_gb() -> float:
  """The device's peak allocation where it reports one, else this process's peak resident memory."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 1e9
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def model_of(s: Setup) -> nn.Module:
  """The variant's model with 100 classes; e2vpt has P = 10, L = 5 (the typical VTAB command), vpt P = 10."""
  prompts = {'e2vpt': (10, 5), 'vpt': (10, 0)}.get(s.transfer, (0, 0))
  return backbones.get_model(s.variant, num_classes=100, num_prompts=prompts[0], num_kv_prompts=prompts[1],
                             dtype=jnp.dtype(s.dtype), remat=s.remat)


def step_setup(s: Setup, training: bool) -> tuple[Callable, tuple, Callable]:
  """The product's jitted train (or eval) step on random ViT weights and a sharded random batch:
  (step, first arguments, next arguments from a step's outputs)."""
  model = model_of(s)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, s.image_size, s.image_size, 3)))['params']
  trainable, frozen = optim.partition(params, optim.predicate(s.transfer))
  mesh = parallel.make_mesh()
  frozen = parallel.replicate(jax.tree.map(lambda x: x.astype(s.dtype), frozen), mesh)
  trainable = parallel.replicate(trainable, mesh)
  batch = jax.device_put({'image': jax.random.normal(jax.random.key(1), (s.batch_size, s.image_size, s.image_size, 3)),
                          'label': jnp.arange(s.batch_size) % 100, 'mask': jnp.ones(s.batch_size)},
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  if not training:
    return jax.jit(functools.partial(train.eval_step, model=model)), (trainable, frozen, batch), lambda out: None
  tx = optim.make_optimizer(1.0, 1e-4, s.batch_size, 13, 100, 10)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx), donate_argnums=(0, 1))
  key = jax.random.key(2)
  return step, (trainable, parallel.replicate(tx.init(trainable), mesh), frozen, batch, key), \
      lambda out: (out[0], out[1], frozen, batch, key)


def measure(s: Setup, training: bool, steps: int, peak_per_device: float = 0) -> dict[str, Any]:
  """Images/s, achieved TFLOP/s, MFU, XLA's step memory, peak memory and compile time of one setup."""
  step, args, feed = step_setup(s, training)
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  flops = compiled.cost_analysis()['flops'] * jax.device_count()
  memory = compiled.memory_analysis()
  out = jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = compiled(*(feed(out) or args))
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / steps
  peak = peak_tflops(peak_per_device)
  return {**dataclasses.asdict(s), 'what': 'train' if training else 'eval', 'step_s': seconds,
          'images_per_s': s.batch_size / seconds, 'tflops': flops / seconds / 1e12,
          'mfu': peak and flops / seconds / 1e12 / peak, 'gflop_per_image': flops / s.batch_size / 1e9,
          'step_memory_gb': (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 1e9,
          'peak_memory_gb': peak_memory_gb(), 'compile_s': compile_s}


def row(r: Mapping[str, Any]) -> str:
  """A markdown table row for BENCHMARKS.md."""
  mfu = '–' if r['mfu'] is None else f"{100 * r['mfu']:.1f} %"
  return (f"| {r['what']} | {r['variant']} {r['image_size']} px | {r['transfer']} | {r['dtype']} | {r['batch_size']} | "
          f"{r['remat'] or 'none'} | {r['images_per_s']:,.1f} img/s ({r['step_s']:.3f} s/step) | {r['tflops']:.2f} | "
          f"{mfu} | {r['step_memory_gb']:.2f} | {r['peak_memory_gb']:.2f} | {r['compile_s']:.1f} |")


def bench_steps(training: bool) -> None:
  device = f'{jax.device_count()} × {jax.devices()[0].device_kind}, jax {jax.__version__}'
  print(f'{device}\n| step | model | transfer | dtype | batch | remat | throughput | TFLOP/s | MFU | '
        'XLA step memory GB | peak memory GB | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|')
  for transfer in FLAGS.transfers:
    for dtype in FLAGS.dtypes:
      for batch_size in map(int, FLAGS.batch_sizes):
        setup = Setup(FLAGS.variant, FLAGS.image_size, batch_size, dtype, transfer, FLAGS.remat)
        print(row(measure(setup, training, FLAGS.steps, FLAGS.peak_tflops)), flush=True)


def one_task(s: Setup, epochs: int, test_images: int) -> dict[str, float]:
  """Wall-clock of one VTAB-style run on synthetic data: `epochs` over 1,000 in-memory images through
  the product's batches and step, then one evaluation over `test_images`, compilation included."""
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, s.image_size, s.image_size, 3), dtype=np.uint8)
  data = data_input.InMemory(images(1000), rng.integers(0, 100, 1000, dtype=np.int32))
  test = [(images(min(1000, test_images - i)), np.zeros(min(1000, test_images - i), np.int32))
          for i in range(0, test_images, 1000)]
  mesh = parallel.make_mesh()
  start = time.perf_counter()
  step, (trainable, opt_state, frozen, _, key), _ = step_setup(s, training=True)
  for epoch in range(epochs):
    for batch in data_input.train_batches(data, s.batch_size, seed=0, epoch=epoch, mesh=mesh):
      trainable, opt_state, _ = step(trainable, opt_state, frozen, batch, key)
  evaluate = jax.jit(functools.partial(train.eval_step, model=model_of(s)))
  totals = [evaluate(trainable, frozen, b) for b in data_input.eval_batches(test, 256, mesh=mesh)]
  jax.block_until_ready(totals)
  return {'epochs': epochs, 'test_images': test_images, 'wall_s': time.perf_counter() - start}


def bench_task() -> None:
  setup = Setup(FLAGS.variant, FLAGS.image_size, int(FLAGS.batch_sizes[0]), FLAGS.dtypes[0],
                FLAGS.transfers[0], FLAGS.remat)
  result = one_task(setup, FLAGS.task_epochs, FLAGS.test_images)
  print(f'one task ({setup}): {result["epochs"]} epochs over 1,000 images + {result["test_images"]:,} test images: '
        f'{result["wall_s"]:.1f} s on {jax.device_count()} × {jax.devices()[0].device_kind}')


def from_config(config: Any, workdir: str) -> list[dict[str, Any]]:
  """`config.mode=bench`: the train and eval steps of the configured model, written to workdir/bench.json."""
  setup = Setup(config.model.variant, 224, config.batch_size, config.compute_dtype, config.transfer,
                config.model.remat)
  rows = [measure(setup, training, 3) for training in (True, False)]
  if parallel.is_lead():  # the lead's timings
    os.makedirs(workdir, exist_ok=True)
    checkpoints.write_json_atomic(os.path.join(workdir, 'bench.json'), rows)
    print('\n'.join(map(row, rows)))
  parallel.barrier(f'bench {workdir}')
  return rows


def run_config(s: Setup, lr: float = 1.0) -> Any:
  """The training config of a measured setup: a scratch backbone, P = 10, L = 5 for e2vpt."""
  c = config_lib.base()
  prompts = {'e2vpt': (10, 5), 'vpt': (10, 0)}.get(s.transfer, (0, 0))
  config_lib.set_transfer(c, s.transfer, *prompts)
  c.pretrained, c.model.variant, c.model.remat, c.compute_dtype = 'scratch', s.variant, s.remat or '', s.dtype
  c.batch_size, c.lr, c.epochs, c.warmup_epochs, c.eval_every_epochs = s.batch_size, lr, 100, 10, 100
  return c


def synthetic(s: Setup, images: int, test_images: int = 0) -> run.Data:
  """Random uint8 images with 100 classes, in memory: what a run's data looks like to its step."""
  rng = np.random.default_rng(0)
  draw = lambda n: rng.integers(0, 256, (n, s.image_size, s.image_size, 3), dtype=np.uint8)
  test = [(draw(test_images), np.zeros(test_images, np.int32))] if test_images else []
  return run.Data(data_input.InMemory(draw(images), rng.integers(0, 100, images, dtype=np.int32)), 100,
                  s.image_size, lambda: test, test_images)


def measure_runs(setup: run.Setup, runs: int, steps: int, peak_per_device: float = 0) -> dict[str, Any]:
  """`run.group_step` of `runs` runs on one device: images/s over the group, TFLOP/s, MFU, XLA's memory."""
  state, fixed, frozen, _ = run.init(setup, [setup.config] * runs)
  keys = np.stack([jax.random.key_data(jax.random.key(i)) for i in range(runs)])
  batch = next(data_input.train_batches(setup.data.train, setup.config.batch_size, seed=0, epoch=0,
                                        mesh=parallel.make_mesh()))
  step = jax.jit(functools.partial(run.group_step, model=setup.model, tx=setup.tx), donate_argnums=0)
  args = (fixed, frozen, (batch,), np.zeros(runs, np.int32), keys)
  start = time.perf_counter()
  compiled = step.lower(state, *args).compile()
  compile_s = time.perf_counter() - start
  flops, memory = compiled.cost_analysis()['flops'], compiled.memory_analysis()
  state, _ = jax.block_until_ready(compiled(state, *args))
  start = time.perf_counter()
  for _ in range(steps):
    state, loss = compiled(state, *args)
  jax.block_until_ready(loss)
  seconds = (time.perf_counter() - start) / steps
  peak = peak_tflops(peak_per_device)
  images = runs * setup.config.batch_size
  return {'runs': runs, 'step_s': seconds, 'images_per_s': images / seconds, 'tflops': flops / seconds / 1e12,
          'mfu': peak and flops / seconds / 1e12 / peak, 'compile_s': compile_s,
          'step_memory_gb': (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                             - memory.alias_size_in_bytes) / 1e9, 'peak_memory_gb': peak_memory_gb()}


def sweep_wall_time(s: Setup, runs: int, epochs: int, runs_per_step: int, workdir: str, images: int = 1000) -> float:
  """Seconds of `run.run_many` over `runs` runs (lrs 0.01 … apart) of `epochs` on `images` synthetic images and
  as many test images, `runs_per_step` at a time: setup, init, compiles, training, evaluation and files."""
  data = synthetic(s, images, images)
  configs = {}
  for i in range(runs):
    c = run_config(s, lr=0.01 * (i + 1))
    c.epochs, c.warmup_epochs, c.eval_every_epochs = epochs, 1, epochs
    configs[f'runs/run{i}'] = c
  start = time.perf_counter()
  run.run_many(configs, workdir, runs_per_step, data=data)
  return time.perf_counter() - start


def bench_runs() -> None:
  """R runs in one step against R steps of one run (same images), then a whole sweep at R = sweep_runs against 1."""
  s = Setup(FLAGS.variant, FLAGS.image_size, int(FLAGS.batch_sizes[0]), FLAGS.dtypes[0], FLAGS.transfers[0],
            FLAGS.remat)
  setup = run.setup(run_config(s), synthetic(s, s.batch_size))
  print(f'{jax.device_count()} × {jax.devices()[0].device_kind}, jax {jax.__version__}; {s}\n'
        '| runs per step | step s | images/s over the group | × one run per step | TFLOP/s | MFU | '
        'XLA step memory GB | peak memory GB | compile s |\n|---|---|---|---|---|---|---|---|---|')
  single = None
  for runs in map(int, FLAGS.runs):
    r = measure_runs(setup, runs, FLAGS.steps, FLAGS.peak_tflops)
    if runs == 1:
      single = r['images_per_s']
    mfu = '–' if r['mfu'] is None else f"{100 * r['mfu']:.1f} %"
    gain = f"{r['images_per_s'] / single:.2f}" if single else '–'
    print(f"| {runs} | {r['step_s']:.3f} | {r['images_per_s']:,.1f} | {gain} | {r['tflops']:.2f} | {mfu} | "
          f"{r['step_memory_gb']:.2f} | {r['peak_memory_gb']:.2f} | {r['compile_s']:.1f} |", flush=True)
  if FLAGS.sweep_runs:
    times = {}
    for per_step in (FLAGS.sweep_runs, 1):
      with tempfile.TemporaryDirectory() as workdir:
        times[per_step] = sweep_wall_time(s, FLAGS.sweep_runs, FLAGS.sweep_epochs, per_step, workdir)
    print(f'sweep of {FLAGS.sweep_runs} runs × {FLAGS.sweep_epochs} epochs (1,000 images, batch {s.batch_size}, '
          f'1,000 test images), all included: {times[FLAGS.sweep_runs]:.1f} s at runs_per_step={FLAGS.sweep_runs}, '
          f'{times[1]:.1f} s at 1 ({times[1] / times[FLAGS.sweep_runs]:.2f} ×)', flush=True)


def bench_init() -> None:
  """A run's parameter set-up: the eager init of the whole model against the jitted, adapter-only init
  (a loaded backbone is read, not drawn)."""
  s = Setup(FLAGS.variant, FLAGS.image_size, 8, FLAGS.dtypes[0], FLAGS.transfers[0], FLAGS.remat)
  c = run_config(s)
  model = run.build_model(c, 100)
  start = time.perf_counter()
  jax.block_until_ready(model.init(jax.random.key(0), jnp.zeros((1, s.image_size, s.image_size, 3))))
  eager = time.perf_counter() - start
  start = time.perf_counter()
  run.init_adapters([c], model, s.image_size)
  jitted = time.perf_counter() - start
  print(f'{s.variant} {s.image_size} px {s.transfer}: eager init of the whole model {eager:.1f} s; jitted '
        f'adapter-only init {jitted:.1f} s ({eager / jitted:.1f} ×)')


BENCHMARKS: dict[str, Callable[[], None]] = {
    'train': functools.partial(bench_steps, True), 'eval': functools.partial(bench_steps, False),
    'runs': bench_runs, 'init': bench_init,
    'task': bench_task, 'input': bench_input, 'prune_flops': bench_prune_flops}


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's records, in the timed sweep
  parallel.initialize(False)
  BENCHMARKS[FLAGS.what]()


if __name__ == '__main__':
  define_flags()
  app.run(main)
