"""Pure training and evaluation steps over (trainable, frozen) parameter trees."""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from e2vpt_jax import optim

Batch = Mapping[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch, as the reference's loss."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def train_step(trainable: Any, opt_state: optax.OptState, frozen: Any, batch: Batch, rng: jax.Array,
               *, model: nn.Module, tx: optax.GradientTransformation) -> tuple[Any, optax.OptState, dict]:
  """One SGD step on the trainable tree; gradients are taken with respect to it alone.

  `rng` drives the prompt dropout (the only stochastic op in training). Returns the new trainable
  tree, the new optimizer state and the batch loss.
  """
  def loss_fn(trainable):
    logits = model.apply({'params': optim.combine(trainable, frozen)}, batch['image'], train=True,
                         rngs={'dropout': rng})
    return cross_entropy(logits, batch['label'])

  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, {'loss': loss}


def eval_step(trainable: Any, frozen: Any, batch: Batch, *, model: nn.Module) -> jax.Array:
  """Logits in eval mode (no dropout)."""
  return model.apply({'params': optim.combine(trainable, frozen)}, batch['image'])
