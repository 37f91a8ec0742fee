"""The config surface: every bad value is one line naming the key, the value and what is valid,
before anything is loaded, trained or written."""

import json
import os

import pytest

from e2vpt_jax import config as config_lib
from e2vpt_jax import main as main_lib
from e2vpt_jax import run
from e2vpt_jax.errors import UserError
from tests.test_run import load_config, main, snapshot

NAN, INF = float('nan'), float('inf')
INTEGER = 'use an integer >= '
# (overrides on configs/demo.py:stage=e2vpt with pretrained=scratch, what the one line must say)
PRUNE = {'mode': 'protocol', 'protocol.prune': True}
BAD = [
    ({'batch_size': 0}, 'config.batch_size=0 is invalid: ' + INTEGER + '1'),
    ({'batch_size': -8}, 'config.batch_size=-8 is invalid'),
    ({'eval_batch_size': 0}, 'config.eval_batch_size=0 is invalid'),
    ({'epochs': 0}, 'config.epochs=0 is invalid: ' + INTEGER + '1'),
    ({'epochs': -3}, 'config.epochs=-3 is invalid'),
    ({'warmup_epochs': 151}, 'config.warmup_epochs=151 is invalid: use at most config.epochs=150'),
    ({'warmup_epochs': -1}, 'config.warmup_epochs=-1 is invalid'),
    ({'seed': -1}, 'config.seed=-1 is invalid: ' + INTEGER + '0'),
    ({'init_seed': -1}, 'config.init_seed=-1 is invalid'),
    ({'checkpoint_every_epochs': 0}, 'config.checkpoint_every_epochs=0 is invalid'),
    ({'eval_every_epochs': 0}, 'config.eval_every_epochs=0 is invalid'),
    ({'log_every_steps': 0}, 'config.log_every_steps=0 is invalid'),
    ({'keep_checkpoints': 0}, 'config.keep_checkpoints=0 is invalid: ' + INTEGER + '1'),
    ({'model.num_prompts': -1}, 'config.model.num_prompts=-1 is invalid'),
    ({'model.num_kv_prompts': -2}, 'config.model.num_kv_prompts=-2 is invalid'),
    ({'lr': NAN}, 'config.lr=nan is invalid: use a finite number > 0'),
    ({'lr': INF}, 'config.lr=inf is invalid'),
    ({'lr': -1.0}, 'config.lr=-1.0 is invalid'),
    ({'lr': 0.0}, 'config.lr=0.0 is invalid'),
    ({'weight_decay': NAN}, 'config.weight_decay=nan is invalid: use a finite number >= 0'),
    ({'weight_decay': -1e-4}, 'config.weight_decay=-0.0001 is invalid'),
    ({'model.prompt_dropout': 1.5}, 'config.model.prompt_dropout=1.5 is invalid: use a number in [0, 1)'),
    ({'model.prompt_dropout': -0.1}, 'config.model.prompt_dropout=-0.1 is invalid'),
    ({'compute_dtype': 'float8'}, "config.compute_dtype='float8' is invalid: use one of ['bfloat16', 'float32']"),
    ({'model.variant': 'B/17'}, "config.model.variant='B/17' is invalid: use one of ["),
    ({'model.attention': 'flash'}, "config.model.attention='flash' is invalid: use one of ['cudnn', 'einsum', "),
    ({'model.remat': 'some'}, "config.model.remat='some' is invalid"),
    ({'transfer': 'lora'}, "config.transfer='lora' is invalid: use one of ['e2vpt', 'full', 'linear', 'vpt']"),
    ({'optimizer': 'adam'}, "config.optimizer='adam' is invalid: use one of ['adamw', 'sgd']"),
    ({'mode': 'search'}, "config.mode='search' is invalid: use one of ['bench', 'demo', 'protocol', 'sweep', 'train']"),
    ({'mode': 'sweep', 'sweep.lrs': ()}, 'config.sweep.lrs=() is invalid: use one or more distinct finite numbers > 0'),
    ({'mode': 'sweep', 'sweep.lrs': (1.0, 0.0)}, 'config.sweep.lrs=(1.0, 0.0) is invalid'),
    ({'mode': 'sweep', 'sweep.lrs': (1.0, 1.0)}, 'config.sweep.lrs=(1.0, 1.0) is invalid'),
    ({'mode': 'sweep', 'sweep.weight_decays': (-1e-4,)}, 'config.sweep.weight_decays=(-0.0001,) is invalid'),
    ({'mode': 'sweep', 'sweep.seeds': (1, 1)}, 'config.sweep.seeds=(1, 1) is invalid'),
    ({'runs_per_step': -1}, 'config.runs_per_step=-1 is invalid: use an integer >= 0'),
    ({'data.source': 'imagenet'}, "config.data.source='imagenet' is invalid: use one of ['demo', 'fgvc', 'vtab']"),
    ({'data.task': 'mnist'}, "config.data.task='mnist' is invalid: use one of ['digits', 'shapes']"),
    ({'data.train_split': 'val'}, "config.data.train_split='val' is invalid: use one of"),
    ({'data.source': 'vtab', 'data.task': 'cifar1000'}, "config.data.task='cifar1000' is invalid"),
    ({'data.source': 'fgvc', 'data.task': 'CUB', 'data.eval_split': 'val200'}, "config.data.eval_split='val200'"),
    ({'prune.tokens': (10,)}, 'config.prune.tokens=(10,) is invalid: use distinct token ids in [0, 10)'),
    ({'prune.tokens': (1, 1)}, 'config.prune.tokens=(1, 1) is invalid'),
    ({'prune.tokens': tuple(range(10))}, 'leaving at least one token'),
    ({'prune.segments': ((16,),)}, 'config.prune.segments=((16,),) is invalid'),
    ({'prune.mode': 'cut'}, "config.prune.mode='cut' is invalid: use one of ['drop', 'mask']"),
    ({'transfer': 'linear', 'prune.tokens': (1,)}, 'pruned prompt entries need prompts'),
    ({'pruning.importance': 'grad'}, "config.pruning.importance='grad' is invalid"),
    ({'pruning.rewind': 'none'}, "config.pruning.rewind='none' is invalid: use one of ['fresh', 'init']"),
    ({'pruning.mode': 'cut'}, "config.pruning.mode='cut' is invalid"),
    ({**PRUNE, 'transfer': 'linear'}, "config.transfer='linear' is invalid: pruning needs prompts"),
    ({**PRUNE, 'pruning.token_counts': (10,)}, 'config.pruning.token_counts=(10,) is invalid'),
    ({**PRUNE, 'pruning.token_counts': (0,)}, 'config.pruning.token_counts=(0,) is invalid'),
    ({**PRUNE, 'pruning.segment_counts': (13,)}, 'config.pruning.segment_counts=(13,) is invalid'),
    ({'mode': 'protocol', 'protocol.seeds': ()}, 'config.protocol.seeds=() is invalid'),
    ({'mode': 'protocol', 'protocol.tune_splits': ('train', 'val')}, 'config.protocol.tune_splits='),
    ({'pretrained': ''}, 'config.pretrained is not set'),
    ({'pretrained': 'missing/ViT-B_16.npz'}, "checkpoint file 'missing/ViT-B_16.npz' does not exist"),
    ({'batch_size': 12}, 'config.batch_size=12 is not divisible by the 8 devices'),
]


def demo_stage(**overrides):
  c = load_config('configs/demo.py', 'stage=e2vpt')
  c.pretrained = 'scratch'
  for key, value in overrides.items():
    config_lib.assign(c, key, value)
  return c


@pytest.mark.parametrize('overrides, message', BAD, ids=[str(o) for o, _ in BAD])
def test_every_bad_value_is_one_line_before_anything_runs(overrides, message):
  c = demo_stage(**overrides)
  with pytest.raises(UserError) as e:
    run.check_run(c)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_the_demo_and_a_stage_config_pass():
  run.check_run(demo_stage())
  run.check_run(load_config('configs/demo.py', None))
  run.check_run(demo_stage(mode='protocol', **{'protocol.prune': True, 'pruning.token_counts': (1, 9),
                                               'pruning.segment_counts': (12,)}))


def test_the_main_command_runs_every_mode():
  assert set(main_lib.MODES) == set(config_lib.MODES)


# Through the command: one `error:` line, exit status 1, no traceback, and a new workdir never created.
COMMAND = [['--config.batch_size=0'], ['--config.lr=nan'],
           ['--config.mode=protocol', '--config.protocol.prune=True', '--config.transfer=linear'], ['--epochs=5']]
# The same without the TINY arguments.
ALONE = [['--config=configs/demo.py', '--config.epochs=5'], ['--config=configs/demo.py', '--config.lr=2.0'],
         ['--config=configs/nope.py'], ['--config=configs/vtab.py:task=cifar1000']]


@pytest.mark.parametrize('args, tiny', [(a, True) for a in COMMAND] + [(a, False) for a in ALONE],
                         ids=[' '.join(a) for a in COMMAND + ALONE])
def test_the_command_reports_a_bad_value_in_one_line_and_creates_nothing(tmp_path, args, tiny):
  code, out, err = main(tmp_path / 'run', *args, tiny=tiny)
  assert code == 1, err
  assert 'Traceback' not in out + err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  assert not (tmp_path / 'run').exists()


def test_the_full_demo_names_where_its_stage_values_go(tmp_path):
  _, _, err = main(tmp_path / 'run', '--config=configs/demo.py', '--config.batch_size=32', tiny=False)
  assert '--config.stages.STAGE.batch_size' in err and 'configs/demo.py:stage=STAGE' in err


def test_a_bad_value_on_an_existing_run_changes_nothing(reference_run):
  before = snapshot(reference_run)
  code, _, err = main(reference_run, '--config.keep_checkpoints=0')
  assert code == 1 and 'config.keep_checkpoints=0 is invalid' in err
  assert snapshot(reference_run) == before


def test_a_corrupt_spec_json_is_one_line(tmp_path):
  (tmp_path / 'spec.json').write_text('{"seed": ')
  code, _, err = main(tmp_path)
  assert code == 1 and err.strip().splitlines() == [
      f"error: workdir '{tmp_path}' has an unreadable spec.json (Expecting value: line 1 column 10 (char 9)): "
      'pass a new --workdir']


def test_a_tilde_in_the_workdir_is_the_home_folder(tmp_path):
  code, _, err = main('~/run', '--config.epochs=1', '--config.warmup_epochs=0', '--config.data.train_split=val200',
                      env={'HOME': str(tmp_path)})
  assert code == 0, err
  assert json.loads((tmp_path / 'run' / 'result.json').read_text())['status'] == 'finished'
  assert not os.path.exists('~')


def test_a_pretrained_file_that_is_not_an_npz_is_one_line_before_anything_loads(tmp_path):
  (tmp_path / 'ViT-B_16.npz').write_text('<html>Not Found</html>')
  code, out, err = main(tmp_path / 'run', f'--config.pretrained={tmp_path / "ViT-B_16.npz"}')
  assert code == 1 and 'Traceback' not in out + err
  assert err.strip().splitlines()[-1].startswith(f"error: checkpoint file '{tmp_path / 'ViT-B_16.npz'}' is not a "
                                                 'readable npz of arrays')
  assert not (tmp_path / 'run').exists()
