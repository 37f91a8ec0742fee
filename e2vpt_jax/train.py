"""Training and evaluation: pure jitted steps and the resumable multi-device loop around them."""

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from e2vpt_jax import checkpoints, masks, metrics, optim, parallel
from e2vpt_jax import config as config_lib
from e2vpt_jax.data import input as data_input
from e2vpt_jax.errors import ConfigError, UserError
from e2vpt_jax.models import vit

Batch = Mapping[str, jax.Array]


class DivergedError(UserError):
  """A run whose loss or parameters stopped being finite; its last good checkpoint is kept."""


class RunInterrupted(UserError):
  """Ctrl-C or SIGTERM during training: the same command resumes from the last checkpoint."""
  exit_code = 130


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy over the real (mask 1) examples, as the reference's loss."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return losses.mean()
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1)


def train_step(trainable: Any, opt_state: optax.OptState, frozen: Any, batch: Batch, rng: jax.Array,
               *, model: nn.Module, tx: optax.GradientTransformation) -> tuple[Any, optax.OptState, dict]:
  """One SGD step on the trainable tree; gradients are taken with respect to it alone.

  `rng` drives the prompt dropout (the only stochastic op in training). Returns the new trainable
  tree, the new optimizer state and the batch loss.
  """
  def loss_fn(trainable):
    logits = model.apply({'params': optim.combine(trainable, frozen)}, batch['image'], train=True,
                         rngs={'dropout': rng})
    return cross_entropy(logits, batch['label'], batch.get('mask'))

  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, {'loss': loss}


def eval_step(trainable: Any, frozen: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
  """Correct predictions and real examples in a padded batch (eval mode, no dropout)."""
  logits = model.apply({'params': optim.combine(trainable, frozen)}, batch['image'])
  mask = batch.get('mask', jnp.ones(logits.shape[:1]))
  return {'correct': ((logits.argmax(-1) == batch['label']) * mask).sum(), 'count': mask.sum()}


@dataclasses.dataclass(frozen=True)
class Data:
  """A run's data: the in-memory training set and a re-startable evaluation stream."""
  train: data_input.InMemory
  num_classes: int
  image_size: int
  eval_examples: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
  augment: data_input.Augment | None = None


def load_data(config: ml_collections.ConfigDict) -> Data:
  """The training and evaluation sets that `config.data` names (source vtab, fgvc or demo)."""
  d = config.data
  data_dir = os.path.expanduser(d.data_dir)
  if d.source == 'vtab':
    from e2vpt_jax.data import vtab
    return Data(vtab.load_in_memory(d.task, d.train_split, data_dir), vtab.get_task(d.task).num_classes,
                vtab.IMAGE_SIZE, lambda: vtab.eval_examples(d.task, d.eval_split, data_dir)[1])
  if d.source == 'fgvc':
    from e2vpt_jax.data import fgvc
    return Data(fgvc.load_train(d.task, data_dir), fgvc.get_dataset(d.task).num_classes, fgvc.CROP,
                lambda: fgvc.eval_examples(d.task, d.eval_split, data_dir)[1], fgvc.random_crop_flip)
  if d.source == 'demo':
    from e2vpt_jax.data import demo
    train, test = demo.load(d.task, d.train_split), demo.load(d.task, d.eval_split)
    part = np.array_split(np.arange(len(test.labels)), jax.process_count())[jax.process_index()]  # as the others
    return Data(train, demo.TASKS[d.task].num_classes, demo.IMAGE_SIZE,
                lambda: [(test.images[part], test.labels[part])])
  raise ConfigError(f"config.data.source={d.source!r} is unknown; use 'vtab', 'fgvc' or 'demo'")


def uses_masks(config: ml_collections.ConfigDict) -> tuple[bool, bool]:
  """(the model has masks, the masks train): pruned entries imply fixed binary masks."""
  pruned = bool(config.prune.tokens or config.prune.segments)
  return config.model.use_masks or pruned, config.train_masks and not pruned


def trainable_predicate(config: ml_collections.ConfigDict) -> optim.Predicate:
  """`optim.is_trainable` for this run's transfer and masks."""
  return optim.predicate(config.transfer, uses_masks(config)[1])


def run_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(init key, dropout key), split from `config.seed`; the init from `config.init_seed` when it is set."""
  init, dropout = jax.random.split(jax.random.key(config.seed))
  if config.init_seed is not None:
    init = jax.random.split(jax.random.key(config.init_seed))[0]
  return init, dropout


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> vit.ViT:
  """The configured ViT; in drop mode without its pruned prompt tokens."""
  m = config.model
  dropped = len(config.prune.tokens) if config.prune.mode == 'drop' else 0
  return vit.get_model(m.variant, num_classes=num_classes, num_prompts=m.num_prompts - dropped,
                       num_kv_prompts=m.num_kv_prompts, use_masks=uses_masks(config)[0],
                       prompt_dropout=m.prompt_dropout, dtype=jnp.dtype(config.compute_dtype), remat=m.remat,
                       attention_fn=vit.ATTENTION[m.attention])


def init_params(config: ml_collections.ConfigDict, model: vit.ViT, image_size: int) -> dict[str, Any]:
  """Prompts and head fresh from the init key (or from `config.init_adapter`), the pruned entries'
  masks set to 0 (and in drop mode their tokens removed), the backbone from `config.pretrained`;
  checked against the model's own parameter template, so nothing the model ignores slips in."""
  images = jnp.zeros((1, image_size, image_size, 3))
  full = model.clone(num_prompts=config.model.num_prompts)
  params = full.init(run_keys(config)[0], images)['params']
  adapter, backbone = optim.partition(params, checkpoints.is_adapter)
  if config.init_adapter:
    adapter = checkpoints.fit(checkpoints.load_adapter(config.init_adapter), adapter,
                              f'adapter {config.init_adapter!r}')
  if config.prune.tokens or config.prune.segments:
    adapter['masks'] = masks.binary_masks(config.model.num_prompts, config.prune.tokens, config.prune.segments)
    if config.prune.mode == 'drop':
      adapter = masks.drop(adapter, config.prune.tokens)
  if config.pretrained != 'scratch':
    backbone = checkpoints.load_backbone(config.pretrained, backbone)
  template = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  return checkpoints.fit(optim.combine(adapter, backbone), template, "the run's parameters")


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir holds one run: resuming it with a config that changes the result (`config_lib.identity`)
  is refused, naming the differences; a harmless change (eval batch size, logging, devices) resumes."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = config_lib.identity(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f'workdir {workdir!r} has an unreadable config.json ({e}): pass a new --workdir') from None
  new = config_lib.identity(config_json(config))
  if old != new:
    diff = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]
    raise ConfigError(f'workdir {workdir!r} holds a run with another config ({"; ".join(diff)}); '
                      'pass a new --workdir, or the same config to resume')


def check_run(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Every check of user input that can fail, before anything is loaded or written: the config's values,
  the batch sizes against the devices, the files the run reads, and the workdir's earlier run."""
  config_lib.validate(config)
  if config.mode == 'demo':
    return
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  if workdir and config.mode == 'train':
    check_workdir(config, workdir)
  if config.mode in ('train', 'prune'):
    if not config.pretrained:
      raise ConfigError("config.pretrained is not set: pass --config.pretrained=PATH/ViT-B_16.npz (Google's "
                        'ImageNet-21k ViT-B/16) or --config.pretrained=scratch for a random backbone')
    for path in (config.pretrained, config.init_adapter):
      if path and path != 'scratch':
        checkpoints.check_npz(path)


def strict(value: Any) -> Any:
  """`value` with every non-finite float replaced by None, so that it is strict JSON."""
  if isinstance(value, Mapping):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  return value


def write_json_atomic(path: str, value: Any) -> None:
  """Strict JSON (no NaN or Infinity tokens), written atomically."""
  checkpoints.write_atomic(path, lambda f: json.dump(strict(value), f, indent=1, default=float, allow_nan=False))


def evaluate(eval_fn: Callable, trainable: Any, frozen: Any, data: Data, batch_size: int, mesh) -> float:
  """Top-1 accuracy over the whole evaluation set, each example counted exactly once."""
  totals = None
  for batch in data_input.eval_batches(data.eval_examples(), batch_size, mesh=mesh):
    out = eval_fn(trainable, frozen, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return float(totals['correct']) / float(totals['count'])


def first_bad_step(losses: list[jax.Array], trainable: Any) -> int | None:
  """Index among `losses` of the first non-finite loss, len(losses) if only the parameters are non-finite,
  or None while the run is finite (one device sync: call it where the loop syncs anyway)."""
  values = np.asarray(jnp.stack(losses))
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    return int(bad[0])
  finite = jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), trainable))
  return None if bool(finite) else len(losses)


def scheduled_lr(config: ml_collections.ConfigDict, epoch: int) -> float:
  """The lr an epoch's steps take: config.lr, times batch_size / 256, times the warmup-cosine factor."""
  return config.lr * config.batch_size / 256 * float(optim.warmup_cosine(epoch, config.warmup_epochs, config.epochs))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.transfer` on all devices, evaluating every `eval_every_epochs`; resumes from workdir.

  Every check that can fail on user input runs before anything is written to `workdir`. A run whose
  loss or parameters stop being finite ends with `"status": "diverged"` in result.json and a DivergedError.
  """
  check_run(config, workdir)
  mesh = parallel.make_mesh()
  data = load_data(config)
  model = build_model(config, data.num_classes)
  params = init_params(config, model, data.image_size)
  pred = trainable_predicate(config)
  report = optim.param_report(params, pred)
  trainable, frozen = optim.partition(params, pred)
  frozen = jax.tree.map(lambda x: x.astype(config.compute_dtype), frozen)
  steps_per_epoch = data_input.steps_per_epoch(len(data.train.labels), config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  tx = optim.make_optimizer(config.lr, config.weight_decay, config.batch_size, steps_per_epoch,
                            config.epochs, config.warmup_epochs, config.optimizer)
  state = parallel.replicate({'trainable': trainable, 'opt_state': tx.init(trainable), 'step': jnp.int32(0),
                              'elapsed': jnp.float32(0)}, mesh)
  frozen = parallel.replicate(frozen, mesh)

  lead = parallel.is_lead()
  os.makedirs(workdir, exist_ok=True)
  if lead:
    write_json_atomic(os.path.join(workdir, 'config.json'), config_json(config))
  manager = checkpoints.run_state_manager(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  state = checkpoints.restore_latest(manager, state) or state
  step, elapsed = int(state['step']), float(state['elapsed'])
  writer = metrics.MetricWriter(workdir, resume_step=step) if lead else None
  if lead and step == 0:  # the starting values, for rewinding to them
    checkpoints.save_adapter(os.path.join(workdir, 'adapter_init.npz'), params)
  if lead:
    print(f"{config.transfer} on {config.data.task}: tuned {report['tuned']:,} of {report['total']:,} parameters "
          f"({report['tuned_percent']:.4f} %), {mesh.size} devices, {total_steps - step} steps to go", flush=True)

  train_fn = jax.jit(functools.partial(train_step, model=model, tx=tx), donate_argnums=(0, 1))
  eval_fn = jax.jit(functools.partial(eval_step, model=model))
  _, dropout_key = run_keys(config)
  trainable, opt_state = state['trainable'], state['opt_state']
  record, start_time = {}, time.time()
  result = {'transfer': config.transfer, 'task': config.data.task, 'eval_split': config.data.eval_split,
            'epochs': config.epochs, 'devices': mesh.size, **report}
  bar = tqdm(total=total_steps * config.batch_size, initial=step * config.batch_size, unit='img',
             unit_scale=True, desc=f'{config.transfer} {config.data.task}', disable=not lead, smoothing=0.1,
             mininterval=0.1 if sys.stderr.isatty() else 30)
  try:
    for epoch in range(step // steps_per_epoch, config.epochs):
      losses, first = [], step
      for batch in data_input.train_batches(data.train, config.batch_size, seed=config.seed, epoch=epoch,
                                            mesh=mesh, start_step=step - epoch * steps_per_epoch,
                                            augment=data.augment):
        trainable, opt_state, out = train_fn(trainable, opt_state, frozen, batch, jax.random.fold_in(dropout_key, step))
        losses.append(out['loss'])
        step += 1
        bar.update(config.batch_size)
        if step % config.log_every_steps == 0:
          loss = float(out['loss'])
          if not np.isfinite(loss):
            break
          bar.set_postfix(epoch=epoch + 1, loss=f'{loss:.4f}')
      bad = first_bad_step(losses, trainable)
      if bad is not None:
        diverged(config, workdir, manager, result, first + bad + 1, losses, bad, scheduled_lr(config, epoch))
      record = {'epoch': epoch + 1, 'train_loss': float(jnp.stack(losses).mean()), 'lr': scheduled_lr(config, epoch)}
      last = epoch + 1 == config.epochs
      if last or (epoch + 1) % config.eval_every_epochs == 0:
        record['eval_accuracy'] = evaluate(eval_fn, trainable, frozen, data, config.eval_batch_size, mesh)
        bar.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.4f}", acc=f"{record['eval_accuracy']:.4f}")
      if writer:
        writer.write(step, record)
      if last or (epoch + 1) % config.checkpoint_every_epochs == 0:
        # elapsed by the lead's clock: a replicated value must be the same on every process
        seconds = parallel.broadcast(elapsed + time.time() - start_time)
        counters = {'step': jnp.int32(step), 'elapsed': jnp.float32(seconds)}
        saved = {'trainable': trainable, 'opt_state': opt_state, **parallel.replicate(counters, mesh)}
        checkpoints.check_space(manager, saved)
        with checkpoints.writing(manager):
          manager.save(step, args=ocp.args.StandardSave(saved))
  except KeyboardInterrupt:
    with checkpoints.writing(manager):
      manager.wait_until_finished()
    raise RunInterrupted(f'interrupted at step {step} of {workdir}; the same command resumes from the last '
                         'checkpoint') from None
  finally:
    bar.close()  # before any message, which then starts a line of its own
  with checkpoints.writing(manager):
    manager.wait_until_finished()
  record = parallel.broadcast(record or (metrics.read(workdir)[-1] if lead else {}))  # a finished run, restarted
  result.update(status='finished', eval_accuracy=record.get('eval_accuracy'), train_loss=record.get('train_loss'),
                steps=step, wall_time_s=elapsed + time.time() - start_time)
  if lead:
    final = optim.combine(trainable, frozen)
    checkpoints.save_adapter(os.path.join(workdir, 'adapter.npz'), final)
    if config.transfer == 'full':
      _, backbone = optim.partition(final, checkpoints.is_adapter)
      checkpoints.save_npz_atomic(os.path.join(workdir, 'backbone.npz'),
                                  {k: np.asarray(v, np.float32) for k, v in checkpoints.flatten(backbone).items()})
    write_json_atomic(os.path.join(workdir, 'result.json'), result)
    writer.close()
    print(f"{config.transfer} on {config.data.task}: {config.data.eval_split} accuracy "
          f"{100 * result['eval_accuracy']:.2f} % after {config.epochs} epochs -> {workdir}", flush=True)
  parallel.barrier(f'finished {workdir}')
  return result


def diverged(config: ml_collections.ConfigDict, workdir: str, manager: ocp.CheckpointManager, result: dict,
             step: int, losses: list[jax.Array], index: int, lr: float) -> None:
  """Records a diverged run in result.json (strict JSON) and raises DivergedError; checkpoints stay as they are."""
  with checkpoints.writing(manager):
    manager.wait_until_finished()
  loss = float(losses[min(index, len(losses) - 1)])
  result.update(status='diverged', diverged_at_step=step, loss=str(loss), lr=config.lr, scheduled_lr=lr)
  if parallel.is_lead():
    write_json_atomic(os.path.join(workdir, 'result.json'), result)
  kept = f'checkpoint {manager.latest_step()}' if manager.latest_step() else 'no checkpoint'
  raise DivergedError(f'the run diverged at step {step}: loss {loss}, config.lr={config.lr:g} ({lr:g} at that step '
                      f'after the batch scaling and schedule); {kept} is kept in {workdir}: lower --config.lr and '
                      'use a new --workdir')
