#!/usr/bin/env python3
"""The toy numbers of README "Reusing prompts": SPoT retrieval and transfer, recycling, ensembling.

Everything runs through the user-facing entry points (`prompt_tuning.train/eval`, `.library`,
`.spot`, `.recycle`) on the bundled toy suite (`tasks/toy.py`) with the demo's backbone size
(`configs/demo/`), on CPU:

1. two toy backbones pre-trained as the demo does, with RANDOM_SEED 0 (A) and 1 (B) (cached);
2. SPoT: source prompts on A (taskless colour/animal/size/indoor, held-out number), random-uniform
   init from one seed, kept in a library; task embeddings (short runs) of two targets
   (`toy_heldout_indoor`, related to the `toy_taskless_indoor` source by construction: the same
   rule on other scenes; `toy_heldout_place`, which shares the place attribute with it); both
   rankings; then each target trained for a fixed small budget from the top-ranked source and from
   the random init;
3. recycling: every source prompt of A recycled to B (v2v-lin, lin-comb, v2v-nn on the English-only
   pieces of the toy vocabulary), rank-classification accuracy on B against B's zero-shot baseline
   and the prompt's own accuracy on A;
4. ensembling: five prompts of `toy_heldout_place` (or --ensemble_task; class-label init, seeds
   1-5) evaluated in one pass
   (`runs/ensemble_eval.gin`): each member, mean, best and the majority-vote ensemble.

    python scripts/reuse_toy.py --output reuse_toy_output   # writes results.json and results.md

A rerun with the same --output reuses every finished run (a killed one restarts from scratch), so
an interrupted run resumes; --ensemble_steps may change between reruns (its prompts are named by
it), the other budgets may not. It took 42 min on a shared 2-core CPU (load 7-10), the two
backbones included.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LABELS = {
    'toy_taskless_colour': ['red', 'blue', 'green', 'yellow', 'black', 'white'],
    'toy_taskless_animal': ['fox', 'owl', 'cat', 'dog', 'frog', 'bear', 'duck', 'wolf'],
    'toy_taskless_size': ['big', 'small'],
    'toy_taskless_indoor': ['yes', 'no'],
    'toy_heldout_indoor': ['yes', 'no'],
    'toy_heldout_place': ['house', 'barn', 'cave', 'kitchen', 'river', 'forest', 'hill', 'field'],
    'toy_heldout_number': ['one', 'two', 'three', 'four', 'five'],
}
SOURCES = [
    'toy_taskless_colour',
    'toy_taskless_animal',
    'toy_taskless_size',
    'toy_taskless_indoor',
    'toy_heldout_number',
]
# Tasks with the scalar `prompt_ids` feature (see `train_prompt`).
TASKLESS = {t for t in SOURCES if t.startswith('toy_taskless_')}
TARGETS = ['toy_heldout_indoor', 'toy_heldout_place']
BACKBONE_STEPS = 1500


def log(msg):
  print(f'[reuse_toy {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def run(args, log_path):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'w') as f:
    proc = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-4000:]
    raise RuntimeError(f'{" ".join(args)} failed:\n{tail}')


def call(args):
  """Runs a `python -m prompt_tuning.*` command line; returns its stdout (raises with stderr)."""
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}')
  return proc.stdout


def cached(path, fn):
  """`fn()`'s JSON result, computed once: kept in `path` so a rerun resumes where it stopped."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  value = fn()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f)
  os.replace(path + '.tmp', path)
  return value


def gin_args(files, bindings):
  return [f'--gin_file={f}' for f in files] + [f'--gin.{k}={v}' for k, v in bindings.items()]


def q(s):
  return repr(str(s))


def backbone(cache, seed):
  model_dir = os.path.join(cache, f'backbone_seed{seed}')
  done = os.path.join(model_dir, 'DONE')
  if not os.path.exists(done):
    log(f'pre-training backbone seed {seed} ({BACKBONE_STEPS} steps)')
    run(
        [sys.executable, '-m', 'prompt_tuning.train']
        + gin_args(['demo/backbone.gin'], {'MODEL_DIR': q(model_dir), 'RANDOM_SEED': str(seed)}),
        model_dir + '.log',
    )
    open(done, 'w').close()
  return os.path.join(model_dir, f'checkpoint_{BACKBONE_STEPS}')


def train_prompt(
    out,
    ckpt,
    task,
    steps,
    *,
    seed=0,
    init='random',
    prompt_file=None,
    library_dir=None,
    entry=None,
    method=None,
    eval_examples=500,
):
  """One prompt-tuning run on the frozen `ckpt`; returns the final inference-eval accuracy.

  The taskless toy tasks are trained without inference evaluation (None is returned):
  `seqio.Evaluator` measures every output feature as a sequence and fails on their scalar
  `prompt_ids` feature. Their accuracy comes from the recycling step's rank classification.
  """
  files = ['models/t5_1_1_prompt.gin', 'runs/prompt_finetune.gin', 'demo/size.gin']
  bindings = {
      'MODEL_DIR': q(out),
      'INITIAL_CHECKPOINT_PATH': q(ckpt),
      'MIXTURE_OR_TASK_NAME': q(task),
      'PROMPT_LENGTH': '10',
      'BATCH_SIZE': '32',
      'TRAIN_STEPS': '1',
      'TRAIN_STEPS_RELATIVE': str(steps),
      'EVAL_PERIOD': str(steps),
      'EVAL_STEPS': '2',
      'EVALUATOR_NUM_EXAMPLES': str(eval_examples),
      'DROPOUT_RATE': '0.0',
      'RANDOM_SEED': str(seed),
      'utils.SaveCheckpointConfig.period': str(steps),
      'utils.create_learning_rate_scheduler.factors': q('constant * cosine_decay'),
      'utils.create_learning_rate_scheduler.base_learning_rate': '0.3',
      'utils.create_learning_rate_scheduler.warmup_steps': '0',
      'utils.create_learning_rate_scheduler.steps_per_cycle': str(steps),
      'utils.create_learning_rate_scheduler.step_offset': str(BACKBONE_STEPS),
  }
  if init == 'random':
    files.insert(1, 'prompts/random_uniform.gin')
  elif init == 'class_labels':
    files.insert(1, 'prompts/from_class_labels.gin')
    bindings['CLASS_LABELS'] = repr(LABELS[task])
  else:
    files.insert(1, 'prompts/from_file.gin')
    bindings['PROMPT_FILE'] = q(prompt_file)
  infer_eval = task not in TASKLESS
  if not infer_eval:
    bindings['train.infer_eval_dataset_cfg'] = 'None'
  if library_dir:
    files.append('runs/add_to_library.gin')
    bindings.update({'LIBRARY_DIR': q(library_dir), 'LIBRARY_ENTRY_NAME': q(entry)})
    if method:
      bindings['library.AddToLibrary.method'] = q(method)

  def train():
    # A run killed half-way would resume from its checkpoint and overshoot the budget: restart it.
    shutil.rmtree(out, ignore_errors=True)
    run([sys.executable, '-m', 'prompt_tuning.train'] + gin_args(files, bindings), out + '.log')
    if not infer_eval:
      return None
    with open(os.path.join(out, 'inference_eval', f'{task}-metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return float(rows[-1]['accuracy'])

  return cached(out + '.result.json', train)


def pct(x):
  """A percentage (the toy `accuracy` metric and rank classification are both in percent)."""
  return f'{x:.1f}'


def markdown(results):
  """The README tables of `results`."""
  settings = results['settings']
  lines = [
      f'Source prompts ({settings["source_steps"]} steps each on backbone A; validation '
      'accuracy by decoding where the run evaluated it, and by rank classification):',
      '',
      '| source task | decoded (%) | rank classification (%) |',
      '|---|---|---|',
  ]
  lines += [
      f'| `{t}` | {"-" if a is None else pct(a)} '
      f'| {pct(results["recycling"][t]["source_on_A"])} |'
      for t, a in results['sources'].items()
  ]
  lines += [
      '',
      f'SPoT retrieval (task embeddings: {settings["embedding_steps"]} steps) and transfer '
      f'({settings["budget"]} steps from the top-ranked source vs. from the random init):',
      '',
      '| target | ranking by mean-pooled cosine | ranking by per-token cosine | SPoT (%) '
      '| random init (%) |',
      '|---|---|---|---|---|',
  ]
  for target, row in results['spot'].items():
    rankings = [
        ', '.join(f'{n.replace("toy_", "")} {s:+.2f}' for n, s in row['ranking'][m])
        for m in ('mean_cosine', 'token_cosine')
    ]
    acc = row['accuracy_at_budget']
    lines.append(
        f'| `{target}` | {rankings[0]} | {rankings[1]} | {pct(acc["spot_best_source"])} '
        f'| {pct(acc["random_init"])} |'
    )
  lines += [
      '',
      'Recycling from backbone A (seed 0) to backbone B (seed 1), rank-classification accuracy '
      '(%):',
      '',
      '| prompt | on A (its own) | B zero-shot | v2v-lin on B | lin-comb on B | v2v-nn on B |',
      '|---|---|---|---|---|---|',
  ]
  for task, row in results['recycling'].items():
    lines.append(
        f'| `{task}` | {pct(row["source_on_A"])} | {pct(row["zero_shot_B"])} '
        f'| {pct(row["v2v-lin"])} | {pct(row["lin-comb"])} | {pct(row["v2v-nn"])} |'
    )
  ens = results['ensembling']
  ens_task = settings.get('ensemble_task', 'toy_heldout_place')
  lines += [
      '',
      f'Ensembling {len(ens["members"])} prompts of `{ens_task}` (class-label init, '
      f'{settings["ensemble_steps"]} steps each, seeds 1-{len(ens["members"])}), majority vote, '
      'accuracy (%):',
      '',
      '| members | mean | best | ensemble |',
      '|---|---|---|---|',
      f'| {", ".join(pct(m) for m in ens["members"])} | {pct(ens["mean"])} | {pct(ens["best"])} '
      f'| {pct(ens["ensemble"])} |',
      '',
      f'Wall time {results["elapsed_s"] / 60:.0f} min on CPU, load average at the end '
      f'{", ".join(f"{x:.1f}" for x in results["load_average"])}.',
      '',
  ]
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--output', default='reuse_toy_output')
  parser.add_argument('--cache', default='.cache/reuse_toy')
  parser.add_argument('--source_steps', type=int, default=500)
  parser.add_argument('--embedding_steps', type=int, default=100)
  parser.add_argument('--budget', type=int, default=150)
  parser.add_argument('--ensemble_steps', type=int, default=200)
  parser.add_argument('--ensemble_size', type=int, default=5)
  parser.add_argument('--ensemble_task', default='toy_heldout_place', choices=TARGETS)
  args = parser.parse_args()
  out = os.path.abspath(args.output)
  cache = os.path.abspath(args.cache)
  os.makedirs(out, exist_ok=True)
  os.makedirs(cache, exist_ok=True)
  lib = os.path.join(out, 'library')
  results = {'settings': vars(args)}
  # Finished runs are reused from --output (see `cached`); they must have been made with the same
  # budgets (the ensemble's runs are named by theirs, so only it may change).
  budgets = {k: getattr(args, k) for k in ('source_steps', 'embedding_steps', 'budget')}
  kept = cached(os.path.join(out, 'budgets.json'), lambda: budgets)
  if kept != budgets:
    raise SystemExit(
        f'{out} holds runs made with {kept}, not {budgets}: pass another --output (or the same '
        'budgets).'
    )
  start = time.time()
  ckpt_a, ckpt_b = backbone(cache, 0), backbone(cache, 1)

  # ---- SPoT
  results['sources'] = {}
  for task in SOURCES:
    log(f'source prompt {task}')
    results['sources'][task] = train_prompt(
        os.path.join(out, 'sources', task),
        ckpt_a,
        task,
        args.source_steps,
        library_dir=lib,
        entry=task,
        method='prompt_tuning',
    )
  results['spot'] = {}
  for target in TARGETS:
    log(f'task embedding of {target}')
    name = f'{target}_embedding'
    train_prompt(
        os.path.join(out, 'embeddings', target),
        ckpt_a,
        target,
        args.embedding_steps,
        library_dir=lib,
        entry=name,
        method='task_embedding',
    )
    spot_args = [
        f'--library={lib}',
        f'--target=library:{name}',
        f'--backbone={ckpt_a}',
    ]
    ranking = json.loads(
        call([sys.executable, '-m', 'prompt_tuning.spot', 'rank', '--json'] + spot_args)
        .strip()
        .splitlines()[-1]
    )
    init_file = os.path.join(out, 'transfer', f'{target}_init.npy')
    os.makedirs(os.path.dirname(init_file), exist_ok=True)
    call(
        [sys.executable, '-m', 'prompt_tuning.spot', 'transfer', f'--output={init_file}']
        + spot_args
    )
    log(f'transfer to {target}: top source {ranking["mean_cosine"][0]["name"]}')
    spot_acc = train_prompt(
        os.path.join(out, 'transfer', f'{target}_spot'),
        ckpt_a,
        target,
        args.budget,
        init='file',
        prompt_file=init_file,
    )
    random_acc = train_prompt(
        os.path.join(out, 'transfer', f'{target}_random'),
        ckpt_a,
        target,
        args.budget,
        init='random',
    )
    results['spot'][target] = {
        'ranking': {
            m: [(r['name'], round(r['score'], 4)) for r in rs] for m, rs in ranking.items()
        },
        'accuracy_at_budget': {'spot_best_source': spot_acc, 'random_init': random_acc},
    }

  # ---- recycling A -> B
  log('recycling')
  results['recycling'] = {}
  for task in SOURCES:
    row = {}
    for recycler in ('v2v-lin', 'lin-comb', 'v2v-nn'):
      command = [
          sys.executable,
          '-m',
          'prompt_tuning.recycle',
          f'--prompt=library:{task}',
          f'--source={ckpt_a}',
          f'--target={ckpt_b}',
          f'--recycler={recycler}',
          f'--library={lib}',
          '--vocabulary=tasks.toy:get_toy_vocabulary',
          '--word_offset=0',
          '--num_words=0',
          f'--eval_task={task}',
          '--eval_module=tasks.toy',
          f'--class_labels={",".join(LABELS[task])}',
          '--input_length=16',
      ]
      res = cached(
          os.path.join(out, 'recycling', f'{task}.{recycler}.json'),
          lambda: json.loads(call(command).split('RESULTS ', 1)[1].splitlines()[0]),
      )
      row[recycler] = res['recycled']
      row['source_on_A'] = res['source']
      row['zero_shot_B'] = res['target_zero_shot']
    results['recycling'][task] = row

  # ---- ensembling
  log('ensembling')
  task = args.ensemble_task
  members = []
  for seed in range(1, args.ensemble_size + 1):
    name = f'{task}_{args.ensemble_steps}steps_seed{seed}'.replace('toy_heldout_', '')
    train_prompt(
        os.path.join(out, 'ensemble', name),
        ckpt_a,
        task,
        args.ensemble_steps,
        seed=seed,
        init='class_labels',
        library_dir=lib,
        entry=name,
    )
    members.append(f'library:{name}')
  eval_dir = os.path.join(out, 'ensemble', f'eval_{task}_{args.ensemble_steps}steps')
  if not os.path.exists(os.path.join(eval_dir, 'ensemble.json')):
    run(
        [sys.executable, '-m', 'prompt_tuning.eval']
        + gin_args(
            [
                'models/t5_1_1_prompt.gin',
                'runs/prompt_eval.gin',
                'runs/ensemble_eval.gin',
                'demo/size.gin',
            ],
            {
                'CHECKPOINT_PATH': q(ckpt_a),
                'EVAL_OUTPUT_DIR': q(eval_dir),
                'MIXTURE_OR_TASK_NAME': q(task),
                'ENSEMBLE': repr(members),
                'LIBRARY_DIR': q(lib),
                'BATCH_SIZE': '32',
            },
        ),
        eval_dir + '.log',
    )
  with open(os.path.join(eval_dir, 'ensemble.json')) as f:
    results['ensembling'] = json.load(f)['tasks'][task]['accuracy']
  results['elapsed_s'] = round(time.time() - start)
  results['load_average'] = os.getloadavg()
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown(results))
  log(f'done in {results["elapsed_s"]} s: {out}/results.json, {out}/results.md')
  print(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
