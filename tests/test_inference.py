"""load_classifier rebuilds the model from two npz files alone."""

import jax
import numpy as np
import pytest

from e2vpt_jax import checkpoints, inference
from tests.conftest import assert_close, golden_adapter_arrays, golden_backbone_arrays


def test_load_classifier_reproduces_the_golden_logits(golden, tmp_path):
  np.savez(tmp_path / 'backbone.npz', **golden_backbone_arrays(golden))
  np.savez(tmp_path / 'adapter.npz', **golden_adapter_arrays(golden))
  classify = inference.load_classifier(str(tmp_path / 'backbone.npz'), str(tmp_path / 'adapter.npz'))
  with jax.default_matmul_precision('highest'):
    assert_close(classify(golden['input/images']), golden['output/logits'])


def test_the_architecture_comes_from_the_shapes(golden):
  backbone = checkpoints.google_vit_params(golden_backbone_arrays(golden))
  adapter = checkpoints.unflatten({k: v for k, v in golden_adapter_arrays(golden).items()
                                   if not k.startswith('masks/')})
  model, size = inference.infer_model(backbone, adapter)
  assert size == 32
  assert (model.patch_size, model.width, model.depth, model.num_heads, model.mlp_dim) == (8, 64, 3, 4, 128)
  assert (model.num_prompts, model.num_kv_prompts, model.num_classes, model.use_masks) == (4, 3, 7, False)


def test_an_adapter_that_does_not_fit_the_backbone_is_named(golden, tmp_path):
  np.savez(tmp_path / 'backbone.npz', **golden_backbone_arrays(golden))
  adapter = golden_adapter_arrays(golden)
  adapter['prompts/kv'] = adapter['prompts/kv'][:, :2]  # 2 heads where the backbone has 4
  np.savez(tmp_path / 'adapter.npz', **adapter)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="adapter .*adapter.npz.*prompts/kv"):
    inference.load_classifier(str(tmp_path / 'backbone.npz'), str(tmp_path / 'adapter.npz'))
