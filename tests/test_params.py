"""Parameter counts and tuned % equal the reference's (e2vpt_method.md §9)."""

import jax
import jax.numpy as jnp
import pytest

from e2vpt_jax import checkpoints, optim
from e2vpt_jax.models import vit


def shapes(variant='B/16', **kwargs):
  model = vit.get_model(variant, **kwargs)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']


def test_vit_b16_backbone_has_85_798_656_parameters():
  _, backbone = optim.partition(shapes(num_classes=100, num_prompts=5, num_kv_prompts=5), checkpoints.is_adapter)
  assert optim.param_report(backbone, lambda path: False)['total'] == 85_798_656


@pytest.mark.parametrize('kwargs, train_masks, tuned, total', [
    (dict(num_classes=100, num_prompts=5, num_kv_prompts=5), True, 169_060, 85_967_716),  # CIFAR-100
    (dict(num_classes=100, num_prompts=5, num_kv_prompts=5, use_masks=True), True, 169_145, 85_967_801),
    (dict(num_classes=100, num_prompts=5, num_kv_prompts=5, use_masks=True), False, 169_060, 85_967_801),
    (dict(num_classes=102, num_prompts=32, num_kv_prompts=5, use_masks=True), True, 419_974, 86_218_630),
    (dict(num_classes=200, num_prompts=5, num_kv_prompts=5, use_masks=True), True, 246_045, 86_044_701),
])
def test_tuned_counts_match_the_reference(kwargs, train_masks, tuned, total):
  report = optim.param_report(shapes(**kwargs), optim.predicate('e2vpt', train_masks))
  assert (report['tuned'], report['total']) == (tuned, total)
  assert report['tuned_percent'] == pytest.approx(100 * tuned / total)


def test_cifar100_tuned_percent_is_0_1967():
  report = optim.param_report(shapes(num_classes=100, num_prompts=5, num_kv_prompts=5), optim.predicate())
  assert round(report['tuned_percent'], 4) == 0.1967


@pytest.mark.parametrize('transfer, kwargs, tuned', [
    ('linear', dict(num_classes=10), 769 * 10),
    ('vpt', dict(num_classes=10, num_prompts=10), 9216 * 10 + 769 * 10),
    ('full', dict(num_classes=10), 85_798_656 + 769 * 10),
])
def test_other_transfer_types(transfer, kwargs, tuned):
  assert optim.param_report(shapes(**kwargs), optim.predicate(transfer))['tuned'] == tuned


def test_unknown_transfer_and_variant_are_named():
  with pytest.raises(ValueError, match="unknown transfer type 'lora'; choose one of .*e2vpt"):
    optim.is_trainable(('head', 'bias'), 'lora')
  with pytest.raises(ValueError, match="unknown ViT variant 'B/32'"):
    vit.get_model('B/32', num_classes=10)
