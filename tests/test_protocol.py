"""The paper's protocol end to end on the offline digits (grid → pruning → final seeds), killed and resumed,
and the report: its averages against hand-made results, its plots, and the launch scripts' commands."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from e2vpt_jax import paper, report
from tests.test_run import ROOT, main, snapshot

# A 2 × 2 grid, two rewinds (N = 1, 2 tokens; M = 4 segments), two final seeds; 2 epochs of 20 steps of 40
# (tune: train800 → val200; final: the 1,000 training digits → the 797 test digits).
PROTOCOL = ['--config=configs/demo.py:stage=e2vpt', '--config.mode=protocol', '--config.protocol.prune=True',
            '--config.pretrained=scratch', '--config.epochs=2', '--config.warmup_epochs=1', '--config.batch_size=40',
            '--config.model.num_prompts=4', '--config.model.num_kv_prompts=2', '--config.sweep.lrs=(0.5,2.0)',
            '--config.sweep.weight_decays=(0.0,0.001)', '--config.pruning.token_counts=(1,2)',
            '--config.pruning.segment_counts=(4,)', '--config.pruning.rewind=init', '--config.protocol.seeds=(42,44)',
            '--config.runs_per_step=4']


def protocol(workdir, wait=True):
  return main(workdir, *PROTOCOL, tiny=False, wait=wait)


def write_report(root, out):
  result = subprocess.run([sys.executable, '-m', 'e2vpt_jax.report', str(root), f'--out={out}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).iterdir())}


def kill_when(process, pattern, root):
  """SIGKILL once a file matching `pattern` exists under `root` (or the process ended)."""
  deadline = time.time() + 240
  while not list(root.glob(pattern)) and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()


@pytest.fixture(scope='module')
def whole(tmp_path_factory):
  """The protocol uninterrupted, and its report."""
  root = tmp_path_factory.mktemp('whole')
  code, out, err = protocol(root / 'digits')
  assert code == 0, err
  return root, write_report(root, root / 'report'), out


@pytest.mark.slow
def test_the_protocol_runs_grid_prune_final_and_resumes_after_two_kills(whole, tmp_path):
  root, files, out = whole
  summary = json.loads((root / 'digits' / 'protocol.json').read_text())
  assert len(summary['grid']['runs']) == 4 and summary['grid']['rule'].startswith('highest last-epoch')
  best = max(summary['grid']['runs'], key=lambda r: (r['eval_accuracy'], -r['lr']))
  assert (summary['grid']['best']['lr'], summary['grid']['best']['weight_decay']) == (best['lr'], best['weight_decay'])
  pruning = summary['pruning']
  assert pruning['stage1'] == f"grid/runs/{best['run']}"
  assert [(r['tokens_pruned'], r['segments_pruned']) for r in pruning['candidates']] == [(1, 4), (2, 4)]
  assert len(pruning['chosen']['tokens']) == pruning['chosen']['tokens_pruned']
  assert [r['seed'] for r in summary['final']['runs']] == [42, 44]
  accuracies = [r['accuracy'] for r in summary['final']['runs']]
  assert summary['final']['mean'] == pytest.approx(np.mean(accuracies))
  assert summary['tuned_after']['tuned'] < summary['tuned_before']['tuned']
  for seed in (42, 44):  # rewind=init: the final runs start from stage 1's initial prompts, with its masks
    final = json.loads((root / 'digits' / 'final' / f'seed{seed}' / 'spec.json').read_text())
    assert final['prune.tokens'] == pruning['chosen']['tokens'] and final['lr'] == best['lr']
    assert final['init_adapter'].endswith(f"grid/runs/{best['run']}/adapter_init.npz")
  assert ' 4 runs, ' in out  # the grid is one group of four

  workdir = tmp_path / 'digits'
  kill_when(protocol(workdir, wait=False), 'grid/groups/*/checkpoints/*', workdir)  # in the grid
  assert not (workdir / 'grid' / 'sweep.json').exists()
  kill_when(protocol(workdir, wait=False), 'groups/*/checkpoints/*', workdir)  # in the rewinds
  assert (workdir / 'grid' / 'sweep.json').exists() and not (workdir / 'protocol.json').exists()
  grid = snapshot(workdir / 'grid' / 'runs')
  code, out, err = protocol(workdir)
  assert code == 0, err
  assert snapshot(workdir / 'grid' / 'runs') == grid and 'sweep of 4 runs' in out  # the grid was not retrained
  assert json.loads((workdir / 'protocol.json').read_text()) == summary
  assert write_report(tmp_path, tmp_path / 'report') == files


@pytest.mark.slow
def test_the_report_writes_its_table_and_valid_plots(whole):
  root, files, _ = whole
  assert {'report.md', 'report.csv', 'accuracy_vs_tuned.png', 'grid_digits.png', 'curves_digits.png',
          'importance_digits.png'} == set(files)
  for name in files:
    if name.endswith('.png'):
      with Image.open(root / 'report' / name) as image:
        image.verify()
        assert image.format == 'PNG' and min(image.size) > 200
  summary = json.loads((root / 'digits' / 'protocol.json').read_text())
  row = next(line for line in files['report.md'].decode().splitlines() if '| digits |' in line)
  assert f"{100 * summary['final']['mean']:.2f} ± {100 * summary['final']['std']:.2f} (2 seeds)" in row


def fake_protocol(root, source, task, accuracy, num_prompts=10):
  """A protocol.json with a known final accuracy (%), as the protocol writes it."""
  tuned = {'tuned': 1, 'total': 100, 'tuned_percent': 0.1}
  final = {'splits': ['train', 'test'], 'mean': accuracy / 100, 'std': 0.01,
           'runs': [{'run': 'final/seed42', 'seed': 42, 'status': 'finished', 'accuracy': accuracy / 100}]}
  summary = {'task': task, 'source': source, 'num_prompts': num_prompts, 'num_kv_prompts': 5, 'final': final,
             'grid': {'best': {'lr': 1.0, 'weight_decay': 0.001}}, 'pruning': None, 'tuned_before': tuned,
             'tuned_after': tuned}
  os.makedirs(root / task)
  (root / task / 'protocol.json').write_text(json.dumps(summary))


def test_the_report_averages_both_vtab_conventions_and_fgvc_without_missing_tasks(tmp_path, monkeypatch):
  monkeypatch.setattr(report, 'plot_grid', lambda *a: None)
  monkeypatch.setattr(report, 'plot_curves', lambda *a: None)
  # Ours: the paper + 1 on every VTAB task but dtd (missing), + 2 on every FGVC task but CUB (missing).
  for task, (accuracy, _) in paper.VTAB.items():
    if task != 'dtd':
      fake_protocol(tmp_path, 'vtab', task, accuracy + 1)
  for task, (accuracy, _) in paper.FGVC.items():
    if task != 'CUB':
      fake_protocol(tmp_path, 'fgvc', task, accuracy + 2)
  means = {m['average']: m for m in report.write(str(tmp_path))['averages']}
  natural = [78.6, 89.4, 98.2, 88.5, 85.3, 52.3]  # without dtd
  specialized, structured = [82.5, 96.8, 84.8, 73.6], [71.7, 61.2, 47.9, 75.8, 80.8, 48.1, 31.7, 41.9]
  groups = means['VTAB mean of the 3 group means (E²VPT: 73.94)']
  same = np.mean([np.mean(natural), np.mean(specialized), np.mean(structured)])
  assert groups['ours'] == pytest.approx(same + 1) and groups['paper_same_tasks'] == pytest.approx(same)
  assert groups['paper'] == pytest.approx(73.94, abs=0.005) and groups['tasks'] == '18/19'
  tasks = means['VTAB 19-task mean (71.42)']
  assert tasks['ours'] == pytest.approx(np.mean(natural + specialized + structured) + 1)
  assert tasks['paper'] == pytest.approx(71.42, abs=0.005)
  assert means['VTAB natural']['ours'] == pytest.approx(np.mean(natural) + 1)
  assert means['VTAB natural']['tasks'] == '6/7'
  fgvc = means['FGVC mean (89.22)']
  assert fgvc['ours'] == pytest.approx(np.mean([84.6, 99.1, 90.5, 82.8]) + 2) and fgvc['paper'] == pytest.approx(89.22)
  text = (tmp_path / 'report.md').read_text()
  assert '| natural | dtd | missing |' in text and '|  | CUB | missing |' in text
  assert '196-way head' in next(line for line in text.splitlines() if '| kitti_distance |' in line)
  rows = (tmp_path / 'report.csv').read_text().splitlines()
  assert len(rows) == 1 + 19 + 5 + len(means)


LAUNCH = sorted(p for p in (ROOT / 'launch').glob('*.sh') if p.name != 'common.sh')  # common.sh is sourced


@pytest.mark.parametrize('script', LAUNCH, ids=[p.name for p in LAUNCH])
def test_every_launch_script_parses_and_prints_its_commands_in_a_dry_run(script, tmp_path):
  for path in (script, ROOT / 'launch' / 'common.sh'):
    assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
  env = {**os.environ, 'ROOT_WORKDIR': str(tmp_path / 'runs'), 'BUCKET': 'gs://bucket', 'PYTHON': sys.executable}
  result = subprocess.run(['bash', str(script), '--dry_run'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  assert 'e2vpt_jax.main' in result.stdout and '--config.mode=protocol' in result.stdout
  assert not (tmp_path / 'runs').exists()  # a dry run only prints


def test_the_readme_runs_the_offline_protocol_this_file_tests():
  import shlex
  text = (ROOT / 'README.md').read_text()
  block = text[text.index('Offline, the same procedure'):]
  block = block[block.index('```bash') + 7:block.index('```', block.index('```bash') + 7)]
  command, report_command = [shlex.split(line) for line in block.replace('\\\n', ' ').strip().splitlines()]
  assert command[:3] == ['python', '-m', 'e2vpt_jax.main']
  assert sorted(a for a in command[3:] if not a.startswith('--workdir=')) == sorted(PROTOCOL)
  workdir = next(a for a in command if a.startswith('--workdir=')).partition('=')[2]
  assert report_command == ['python', '-m', 'e2vpt_jax.report', os.path.dirname(workdir)]


def test_the_papers_numbers_cover_the_task_tables_and_give_its_averages():
  from e2vpt_jax.data import fgvc, vtab
  assert list(paper.VTAB) == list(vtab.TASKS) and list(paper.FGVC) == list(fgvc.DATASETS)
  groups = report.vtab_groups()
  means = {g: np.mean([a for t, (a, _) in paper.VTAB.items() if groups[t] == g]) for g in report.GROUPS}
  for group, mean in means.items():
    assert mean == pytest.approx(paper.VTAB_GROUP_MEANS[group], abs=0.005)
  assert np.mean(list(means.values())) == pytest.approx(paper.VTAB_MEAN_OF_GROUPS, abs=0.005)
  assert np.mean([a for a, _ in paper.VTAB.values()]) == pytest.approx(paper.VTAB_TASK_MEAN, abs=0.005)
  assert np.mean([a for a, _ in paper.FGVC.values()]) == pytest.approx(paper.FGVC_MEAN, abs=0.005)
