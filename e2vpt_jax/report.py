"""The paper's table from finished protocols: `python -m e2vpt_jax.report ROOT [--out DIR]`.

Reads ROOT/protocol.json and every ROOT/*/protocol.json (one task each, from `--config.mode=protocol`) and
the final runs' metrics.jsonl; writes report.md, report.csv and PNG plots (accuracy against tuned %, each
grid's lr × wd accuracies, each pruned task's importance, the final runs' curves). Reads nothing else and
trains nothing; a task without a protocol.json is shown as missing, never averaged in.
"""

import csv
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from e2vpt_jax import paper  # noqa: E402

COLUMNS = ('source', 'group', 'task', 'status', 'accuracy', 'std', 'seeds', 'paper_accuracy', 'difference', 'lr',
           'weight_decay', 'num_prompts', 'num_kv_prompts', 'tokens_pruned', 'segments_pruned', 'tuned_before',
           'tuned_after', 'paper_tuned', 'note')
GROUPS = ('natural', 'specialized', 'structured')


def vtab_groups() -> dict[str, str]:
  """Each VTAB task's group, from the task table."""
  from e2vpt_jax.data import vtab
  return {name: task.group for name, task in vtab.TASKS.items()}


def find(root: str) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
  """(source, task) -> (its workdir, its protocol.json) for ROOT and each folder in it."""
  found = {}
  folders = [root] + [os.path.join(root, d) for d in sorted(os.listdir(root))]
  for folder in folders:
    path = os.path.join(folder, 'protocol.json')
    if os.path.isfile(path):
      with open(path) as f:
        summary = json.load(f)
      found[summary['source'], summary['task']] = (folder, summary)
  return found


def task_row(source: str, group: str, task: str, summary: Mapping[str, Any] | None,
             published: tuple[float, float] | None) -> dict[str, Any]:
  """One row of the table: ours (mean ± std over seeds, %), the choices made, and the paper's number."""
  row = dict.fromkeys(COLUMNS, '')
  row.update(source=source, group=group, task=task, status='missing', note=paper.NOTES.get(task, ''))
  if published:
    row['paper_accuracy'], row['paper_tuned'] = published
  if summary is None:
    return row
  final, grid, pruned = summary['final'], summary['grid']['best'], summary['pruning']
  row.update(status='done', accuracy=100 * final['mean'], std=100 * final['std'],
             seeds=sum(r['status'] == 'finished' for r in final['runs']), lr=grid['lr'],
             weight_decay=grid['weight_decay'], num_prompts=summary['num_prompts'],
             num_kv_prompts=summary['num_kv_prompts'], tuned_before=summary['tuned_before']['tuned_percent'],
             tuned_after=summary['tuned_after']['tuned_percent'])
  if pruned:
    row.update(tokens_pruned=pruned['chosen']['tokens_pruned'], segments_pruned=pruned['chosen']['segments_pruned'])
  if published:
    row['difference'] = row['accuracy'] - published[0]
  return row


def table(found: Mapping[tuple[str, str], tuple[str, dict]]) -> list[dict[str, Any]]:
  """A row per task of every benchmark with a result in ROOT (all its tasks, missing ones too), then the rest."""
  sources = {source for source, _ in found}
  rows = []
  if 'vtab' in sources:
    groups = vtab_groups()
    rows += [task_row('vtab', groups[t], t, found.get(('vtab', t), (None, None))[1], paper.VTAB[t])
             for g in GROUPS for t in paper.VTAB if groups[t] == g]
  if 'fgvc' in sources:
    rows += [task_row('fgvc', '', t, found.get(('fgvc', t), (None, None))[1], paper.FGVC[t]) for t in paper.FGVC]
  rows += [task_row(source, '', t, summary, None) for (source, t), (_, summary) in sorted(found.items())
           if source not in ('vtab', 'fgvc')]
  return rows


def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if values else None


def average(name: str, rows: Sequence[Mapping[str, Any]], groups: Sequence[Sequence[Mapping]] = ()) -> dict:
  """Ours over the finished tasks, the paper's over the same tasks and over all: the plain mean of `rows`, or
  with `groups` the mean of the groups' means (each over its finished tasks)."""
  done = [r for r in rows if r['status'] == 'done']
  if groups:
    parts = [[r for r in g if r['status'] == 'done'] for g in groups]
    ours = _mean([_mean([r['accuracy'] for r in p]) for p in parts if p])
    same = _mean([_mean([r['paper_accuracy'] for r in p]) for p in parts if p])
    every = _mean([_mean([r['paper_accuracy'] for r in g]) for g in groups])
  else:
    ours, same = _mean([r['accuracy'] for r in done]), _mean([r['paper_accuracy'] for r in done])
    every = _mean([r['paper_accuracy'] for r in rows])
  return {'average': name, 'ours': ours, 'paper_same_tasks': same, 'paper': every, 'tasks': f'{len(done)}/{len(rows)}'}


def averages(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """VTAB's group means, both VTAB conventions and the FGVC mean, for the benchmarks present."""
  out = []
  vtab = [r for r in rows if r['source'] == 'vtab']
  if vtab:
    by_group = [[r for r in vtab if r['group'] == g] for g in GROUPS]
    out += [average(f'VTAB {g}', part) for g, part in zip(GROUPS, by_group)]
    out.append(average('VTAB mean of the 3 group means (E²VPT: 73.94)', vtab, by_group))
    out.append(average('VTAB 19-task mean (71.42)', vtab))
  fgvc = [r for r in rows if r['source'] == 'fgvc']
  if fgvc:
    out.append(average('FGVC mean (89.22)', fgvc))
  return out


def _fmt(value: Any, digits: int = 2) -> str:
  if value is None or value == '':
    return '–'
  return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def markdown(rows: Sequence[Mapping[str, Any]], means: Sequence[Mapping[str, Any]], plots: Sequence[str]) -> str:
  """report.md: the task table, the averages, the plots."""
  lines = ['# E²VPT: ours against the paper', '',
           'Accuracy: top-1 %, mean ± standard deviation (ddof 0) of the last-epoch accuracy over the final seeds. '
           'Paper: E²VPT with ViT-B/16 (ImageNet-21k). Tuned %: trainable share of all parameters with the head, '
           'before and after pruning. Missing tasks are shown, never averaged in; each average also gives the '
           "paper's over the same tasks.", '',
           '| group | task | ours | paper | Δ | lr | wd | P | L | N | M | tuned % | after pruning | paper tuned % '
           '| note |', '|' + '---|' * 15]
  for r in rows:
    ours = f"{r['accuracy']:.2f} ± {r['std']:.2f} ({r['seeds']} seed{'s' * (r['seeds'] != 1)})" if r['status'] == 'done' else 'missing'
    cells = [r['group'], r['task'], ours, _fmt(r['paper_accuracy'], 1), _fmt(r['difference']), _fmt(r['lr'], 4),
             _fmt(r['weight_decay'], 4), _fmt(r['num_prompts']), _fmt(r['num_kv_prompts']), _fmt(r['tokens_pruned']),
             _fmt(r['segments_pruned']), _fmt(r['tuned_before'], 3), _fmt(r['tuned_after'], 3),
             _fmt(r['paper_tuned']), r['note']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if means:
    lines += ['', '| average | ours | paper, same tasks | paper | tasks |', '|---|---|---|---|---|']
    lines += [f"| {m['average']} | {_fmt(m['ours'])} | {_fmt(m['paper_same_tasks'])} | {_fmt(m['paper'])} | "
              f"{m['tasks']} |" for m in means]
  lines += [''] + [f'![{os.path.splitext(p)[0]}]({p})' for p in plots]
  return '\n'.join(lines) + '\n'


def write_csv(rows: Sequence[Mapping[str, Any]], means: Sequence[Mapping[str, Any]]) -> str:
  """report.csv: a row per task, then a row per average (task = the average's name)."""
  out = io.StringIO()
  writer = csv.DictWriter(out, COLUMNS, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  for m in means:
    writer.writerow({**dict.fromkeys(COLUMNS, ''), 'source': 'average', 'task': m['average'], 'status': m['tasks'],
                     'accuracy': m['ours'], 'paper_accuracy': m['paper_same_tasks']})
  return out.getvalue()


def _save(fig: plt.Figure, path: str) -> None:
  fig.savefig(path, dpi=100, bbox_inches='tight', metadata={'Software': None})
  plt.close(fig)


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Accuracy against tuned % (after pruning) per task, ours beside the paper's, a line between the two."""
  fig, ax = plt.subplots(figsize=(8, 6))
  done = [r for r in rows if r['status'] == 'done']
  for r in done:
    if r['paper_accuracy'] != '':
      ax.plot([r['tuned_after'], r['paper_tuned']], [r['accuracy'], r['paper_accuracy']], color='0.8', zorder=1)
    ax.annotate(r['task'], (r['tuned_after'], r['accuracy']), fontsize=7, xytext=(3, 3), textcoords='offset points')
  ax.scatter([r['tuned_after'] for r in done], [r['accuracy'] for r in done], label='ours', zorder=2)
  published = [r for r in done if r['paper_accuracy'] != '']
  if published:
    ax.scatter([r['paper_tuned'] for r in published], [r['paper_accuracy'] for r in published], marker='x',
               label='paper', zorder=2)
  ax.set(xlabel='tuned parameters (% of all)', ylabel='top-1 accuracy (%)', title='Accuracy against tuned share')
  ax.legend()
  _save(fig, path)


def plot_grid(task: str, grid: Mapping[str, Any], path: str) -> None:
  """The grid's selection accuracy per lr (rows) and weight decay (columns); diverged runs blank, the choice boxed."""
  key = grid['selected_by']
  lrs = sorted({r['lr'] for r in grid['runs']}, reverse=True)
  wds = sorted({r['weight_decay'] for r in grid['runs']}, reverse=True)
  cells: dict[tuple[int, int], list[float]] = {}
  for r in grid['runs']:
    if r['status'] == 'finished':
      cells.setdefault((lrs.index(r['lr']), wds.index(r['weight_decay'])), []).append(100 * r[key])
  values = np.full((len(lrs), len(wds)), np.nan)
  for cell, accuracies in cells.items():
    values[cell] = np.mean(accuracies)  # over the grid's seeds
  fig, ax = plt.subplots(figsize=(1.2 * len(wds) + 3, 0.45 * len(lrs) + 2))
  image = ax.imshow(values, cmap='viridis', aspect='auto')
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, 'diverged' if np.isnan(v) else f'{v:.1f}', ha='center', va='center', fontsize=8, color='w')
  best = grid['best']
  if best:
    i, j = lrs.index(best['lr']), wds.index(best['weight_decay'])
    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red', linewidth=2))
  ax.set_xticks(range(len(wds)), [f'{w:g}' for w in wds])
  ax.set_yticks(range(len(lrs)), [f'{lr:g}' for lr in lrs])
  ax.set(xlabel='weight decay', ylabel='lr', title=f"{task}: {grid['eval_split']} accuracy (%)\n{grid['rule']}")
  ax.title.set_fontsize(9)
  fig.colorbar(image, ax=ax)
  _save(fig, path)


def plot_importance(task: str, pruning: Mapping[str, Any], path: str) -> None:
  """The stage-1 token scores (the pruned tokens in red) and segment scores (token × segment)."""
  tokens, segments = np.asarray(pruning['scores']['token']), np.asarray(pruning['scores']['segment'])
  pruned = set(pruning['chosen']['tokens'])
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  left.bar(range(len(tokens)), tokens, color=['tab:red' if t in pruned else 'tab:blue' for t in range(len(tokens))])
  left.set(xlabel='prompt token', ylabel=f"{pruning['importance']} score",
           title=f"{task}: token importance (red: pruned, N={pruning['chosen']['tokens_pruned']})")
  image = right.imshow(segments, cmap='coolwarm', aspect='auto')
  right.set(xlabel='segment', ylabel='prompt token',
            title=f"segment importance (M={pruning['chosen']['segments_pruned']} pruned per token)")
  for axis in (left.xaxis, right.xaxis, right.yaxis):
    axis.set_major_locator(ticker.MaxNLocator(integer=True))
  fig.colorbar(image, ax=right)
  _save(fig, path)


def plot_curves(task: str, folder: str, final: Mapping[str, Any], path: str) -> None:
  """The final runs' training loss and evaluated accuracy per epoch, a line per seed."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for r in final['runs']:
    with open(os.path.join(folder, r['run'], 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f if line.strip()]
    left.plot([m['epoch'] for m in records], [m['train_loss'] for m in records], label=f"seed {r['seed']}")
    evals = [m for m in records if 'eval_accuracy' in m]
    right.plot([m['epoch'] for m in evals], [100 * m['eval_accuracy'] for m in evals], marker='o',
               label=f"seed {r['seed']}")
  left.set(xlabel='epoch', ylabel='training loss', title=f'{task}: final runs')
  right.set(xlabel='epoch', ylabel=f'{final["splits"][1]} accuracy (%)', title='evaluated epochs')
  left.legend(fontsize=7)
  for axis in (left.xaxis, right.xaxis):
    axis.set_major_locator(ticker.MaxNLocator(integer=True))
  _save(fig, path)


def write(root: str, out: str | None = None) -> dict[str, Any]:
  """Writes report.md, report.csv and the plots into `out` (default ROOT); returns the rows and averages."""
  found = find(root)
  if not found:
    raise FileNotFoundError(f'no protocol.json in {root} or its folders: run --config.mode=protocol first')
  out = out or root
  os.makedirs(out, exist_ok=True)
  rows, plots = table(found), ['accuracy_vs_tuned.png']
  means = averages(rows)
  plot_tradeoff(rows, os.path.join(out, plots[0]))
  for (_, task), (folder, summary) in sorted(found.items()):
    plot_grid(task, summary['grid'], os.path.join(out, f'grid_{task}.png'))
    plot_curves(task, folder, summary['final'], os.path.join(out, f'curves_{task}.png'))
    plots += [f'grid_{task}.png', f'curves_{task}.png']
    if summary['pruning']:
      plot_importance(task, summary['pruning'], os.path.join(out, f'importance_{task}.png'))
      plots.append(f'importance_{task}.png')
  for name, text in (('report.md', markdown(rows, means, plots)), ('report.csv', write_csv(rows, means))):
    with open(os.path.join(out, name + '.tmp'), 'w') as f:
      f.write(text)
    os.replace(os.path.join(out, name + '.tmp'), os.path.join(out, name))
  return {'rows': rows, 'averages': means}


_OUT = flags.DEFINE_string('out', None, 'where report.md, report.csv and the plots go (default: ROOT)')


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    sys.exit('usage: python -m e2vpt_jax.report ROOT_WORKDIR [--out DIR]')
  try:
    result = write(argv[1], _OUT.value)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  for m in result['averages']:
    print(f"{m['average']}: ours {_fmt(m['ours'])} (paper on the same tasks {_fmt(m['paper_same_tasks'])}, "
          f"{m['tasks']} tasks)")
  print(f'wrote {os.path.join(_OUT.value or argv[1], "report.md")}')


if __name__ == '__main__':
  app.run(main)
