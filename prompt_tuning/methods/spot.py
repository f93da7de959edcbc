"""SPoT: soft prompt transfer with task retrieval (Vu, Lester, Constant, Al-Rfou', Cer; ACL 2022).

1. Source prompts are trained on source tasks or mixtures with the standard recipe and kept in a
   prompt library (`configs/spot/source.gin` = a prompt-tuning run plus `runs/add_to_library.gin`).
2. A target task gets a **task embedding**: the prompt of a short prompt-tuning run on it
   (`configs/spot/task_embedding.gin`, also added to the library).
3. Retrieval ranks the library's prompts of the same backbone against the task embedding by
   * ``mean_cosine``: cosine of the mean-pooled prompts, cos(mean_k s_k, mean_k' t_k');
   * ``token_cosine``: average per-token cosine over every token pair,
     (1 / (L_s L_t)) Σ_k Σ_k' cos(s_k, t_k').
4. Transfer: the target prompt starts from the best source (`init='best'`) or from the average of
   the top k (`init='average'`), through `prompts/from_file.gin` (or `prompts/from_library.gin`);
   nothing else in the recipe changes.

`python -m prompt_tuning.spot rank` prints the ranking; `spot transfer` writes the initial prompt
and, given training flags after `--`, runs `python -m prompt_tuning.train` from it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from prompt_tuning import fs

METRICS = ('mean_cosine', 'token_cosine')


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  an = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return an @ bn.T


def mean_cosine(source: np.ndarray, target: np.ndarray) -> float:
  """Cosine of the mean-pooled prompts (`[L_s, H]`, `[L_t, H]`)."""
  return float(
      _cos(np.mean(source, axis=0, keepdims=True), np.mean(target, axis=0, keepdims=True))[0, 0]
  )


def token_cosine(source: np.ndarray, target: np.ndarray) -> float:
  """Average cosine over every pair of a source token and a target token."""
  return float(np.mean(_cos(source, target)))


SIMILARITIES = {'mean_cosine': mean_cosine, 'token_cosine': token_cosine}


@dataclasses.dataclass(frozen=True)
class Ranked:
  """One library entry and its similarity to the target's task embedding."""

  name: str
  score: float
  task: Optional[str]


def rank(
    target: np.ndarray,
    sources: Mapping[str, np.ndarray],
    metric: str = 'mean_cosine',
    tasks: Optional[Mapping[str, Optional[str]]] = None,
) -> List[Ranked]:
  """Sources by descending similarity to `target` (ties by name)."""
  if metric not in SIMILARITIES:
    raise ValueError(f'Unknown SPoT similarity {metric!r}; choose one of {", ".join(METRICS)}.')
  target = np.asarray(target)
  fn = SIMILARITIES[metric]
  out = []
  for name, prompt in sources.items():
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[-1] != target.shape[-1]:
      raise ValueError(
          f'Source {name!r} has shape {prompt.shape}, the task embedding {target.shape}: rank '
          'prompts of one backbone.'
      )
    out.append(Ranked(name, fn(prompt, target), (tasks or {}).get(name)))
  return sorted(out, key=lambda r: (-r.score, r.name))


def library_sources(
    lib: Any,
    backbone: Any,
    *,
    exclude: Sequence[str] = (),
    methods: Optional[Sequence[str]] = None,
) -> Tuple[Dict[str, np.ndarray], Dict[str, Optional[str]]]:
  """`({name: prompt}, {name: task})`: the library's single prompts trained on `backbone`
  (banks and task embeddings are left out, and `exclude`d names)."""
  prompts, tasks = {}, {}
  for info in lib.list(backbone=backbone):
    meta = info.metadata
    if info.name in exclude or meta.get('kind') != 'prompt':
      continue
    if meta.get('method') == 'task_embedding':
      continue
    if methods is not None and meta.get('method') not in methods:
      continue
    prompts[info.name] = lib.get(info.name).array
    tasks[info.name] = meta.get('task')
  return prompts, tasks


def transfer_init(
    ranked: Sequence[Ranked], sources: Mapping[str, np.ndarray], init: str = 'best', top_k: int = 3
) -> Tuple[np.ndarray, List[str]]:
  """The target's initial prompt: the best source, or the mean of the top k (same shapes)."""
  if not ranked:
    raise ValueError('No source prompt to transfer from (the library has none for this backbone).')
  if init == 'best':
    chosen = [ranked[0].name]
  elif init == 'average':
    chosen = [r.name for r in ranked[: max(1, top_k)]]
  else:
    raise ValueError(f"SPoT init must be 'best' or 'average', got {init!r}.")
  shapes = {tuple(np.shape(sources[n])) for n in chosen}
  if len(shapes) != 1:
    raise ValueError(
        f'The top-{len(chosen)} sources have different shapes {shapes}: average '
        'prompts of one length (or use init=best).'
    )
  value = np.mean([np.asarray(sources[n], np.float64) for n in chosen], axis=0)
  return value.astype(np.float32), chosen


# ----------------------------------------------------------------------------------------------
# Command line: python -m prompt_tuning.spot {rank,transfer}
# ----------------------------------------------------------------------------------------------


def _target_prompt(ref: str, library_dir: Optional[str], backbone: Any) -> np.ndarray:
  from prompt_tuning import library  # pylint: disable=g-import-not-at-top
  from prompt_tuning import prompts  # pylint: disable=g-import-not-at-top

  if library.is_ref(ref):
    return library.load_prompt(ref, library_dir, backbone)
  if fs.isdir(ref):  # a model directory of the short run: its latest saved prompt
    steps = library.numpy_prompt_steps(ref, 'encoder.prompt.prompt.prompt.npy')
    if not steps:
      raise ValueError(f'{ref} has no saved prompt under numpy_checkpoints/.')
    ref = fs.join(
        ref, 'numpy_checkpoints', f'checkpoint_{steps[-1]}', 'encoder.prompt.prompt.prompt.npy'
    )
  return prompts.np_load(ref)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m prompt_tuning.spot`; returns the exit code."""
  import argparse  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from prompt_tuning import library  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv[1:] if argv is None else argv)
  train_args: List[str] = []
  if '--' in argv:
    i = argv.index('--')
    argv, train_args = argv[:i], argv[i + 1 :]
  parser = argparse.ArgumentParser(
      prog='python -m prompt_tuning.spot',
      description='SPoT: rank library prompts against a task embedding; transfer from the best.',
  )
  sub = parser.add_subparsers(dest='command', required=True)
  for name in ('rank', 'transfer'):
    p = sub.add_parser(name)
    p.add_argument('--library', default=os.environ.get(library.ENV_VAR), help='LIBRARY_DIR')
    p.add_argument(
        '--target',
        required=True,
        help="task embedding: library:NAME, a .npy, or the short run's MODEL_DIR",
    )
    p.add_argument('--backbone', required=True, help='the frozen checkpoint (fingerprint filter)')
    p.add_argument('--metric', default='mean_cosine', choices=METRICS)
    p.add_argument('--exclude', action='append', default=[], help='library entries to skip')
    p.add_argument('--json', action='store_true')
    if name == 'transfer':
      p.add_argument('--init', default='best', choices=('best', 'average'))
      p.add_argument('--top_k', type=int, default=3)
      p.add_argument('--output', required=True, help='.npy (or library:NAME) initial prompt')
  args = parser.parse_args(argv)
  try:
    lib = library.Library(args.library)
    target = _target_prompt(args.target, args.library, args.backbone)
    exclude = list(args.exclude)
    if library.is_ref(args.target):
      exclude.append(library.parse_ref(args.target))
    sources, tasks = library_sources(lib, args.backbone, exclude=exclude)
    ranked = {m: rank(target, sources, m, tasks) for m in METRICS}
    if args.json:
      print(json.dumps({m: [dataclasses.asdict(r) for r in rs] for m, rs in ranked.items()}))
    else:
      for m in METRICS:
        print(f'{m}:' + (' (used)' if m == args.metric else ''))
        for i, r in enumerate(ranked[m]):
          print(f'  {i + 1:2d}. {r.name:<32} {r.score:+.4f}  task={r.task or "-"}')
    if args.command == 'transfer':
      value, chosen = transfer_init(ranked[args.metric], sources, args.init, args.top_k)
      meta = {
          'method': 'spot_init',
          'spot_init': args.init,
          'sources': chosen,
          'metric': args.metric,
      }
      if library.is_ref(args.output):
        lib.add(library.parse_ref(args.output), value, meta, backbone=args.backbone, overwrite=True)
      else:
        import io  # pylint: disable=g-import-not-at-top

        buffer = io.BytesIO()
        np.save(buffer, value)
        fs.write_bytes(args.output, buffer.getvalue())
      print(f'initial prompt ({args.init} of {chosen}) written to {args.output}')
      if train_args:
        if library.is_ref(args.output):
          init = [
              '--gin_file=prompts/from_library.gin',
              f'--gin.PROMPT_NAME={library.parse_ref(args.output)!r}',
              f'--gin.LIBRARY_DIR={lib.path!r}',
          ]
        else:
          init = ['--gin_file=prompts/from_file.gin', f'--gin.PROMPT_FILE={args.output!r}']
        command = [sys.executable, '-m', 'prompt_tuning.train'] + train_args + init
        print('running ' + ' '.join(command), flush=True)
        return subprocess.call(command)
  except (library.LibraryError, ValueError, FileNotFoundError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f'ERROR: {type(e).__name__}: {msg}', file=sys.stderr)
    return 1
  return 0
