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
4. ensembling: five prompts of `toy_heldout_place` (seeds 1-5) evaluated in one pass
   (`runs/ensemble_eval.gin`): each member, mean, best and the majority-vote ensemble.

    python scripts/reuse_toy.py --output reuse_toy_output   # writes results.json and results.md
"""

import argparse
import json
import os
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
TARGETS = ['toy_heldout_indoor', 'toy_heldout_place']
BACKBONE_STEPS = 1500


def log(msg):
  print(f'[reuse_toy {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def run(args, log_path):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  with open(log_path, 'w') as f:
    proc = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-4000:]
    raise RuntimeError(f'{" ".join(args)} failed:\n{tail}')


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
  """One prompt-tuning run on the frozen `ckpt`; returns the final inference-eval accuracy."""
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
  if library_dir:
    files.append('runs/add_to_library.gin')
    bindings.update({'LIBRARY_DIR': q(library_dir), 'LIBRARY_ENTRY_NAME': q(entry)})
    if method:
      bindings['library.AddToLibrary.method'] = q(method)
  run([sys.executable, '-m', 'prompt_tuning.train'] + gin_args(files, bindings), out + '.log')
  with open(os.path.join(out, 'inference_eval', f'{task}-metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return float(rows[-1]['accuracy'])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--output', default='reuse_toy_output')
  parser.add_argument('--cache', default='.cache/reuse_toy')
  parser.add_argument('--source_steps', type=int, default=500)
  parser.add_argument('--embedding_steps', type=int, default=100)
  parser.add_argument('--budget', type=int, default=150)
  parser.add_argument('--ensemble_steps', type=int, default=200)
  parser.add_argument('--ensemble_size', type=int, default=5)
  args = parser.parse_args()
  out = os.path.abspath(args.output)
  cache = os.path.abspath(args.cache)
  os.makedirs(out, exist_ok=True)
  os.makedirs(cache, exist_ok=True)
  lib = os.path.join(out, 'library')
  results = {'settings': vars(args)}
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
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'prompt_tuning.spot',
            'rank',
            f'--library={lib}',
            f'--target=library:{name}',
            f'--backbone={ckpt_a}',
            '--json',
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        check=True,
    )
    ranking = json.loads(proc.stdout.strip().splitlines()[-1])
    init_file = os.path.join(out, 'transfer', f'{target}_init.npy')
    os.makedirs(os.path.dirname(init_file), exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            '-m',
            'prompt_tuning.spot',
            'transfer',
            f'--library={lib}',
            f'--target=library:{name}',
            f'--backbone={ckpt_a}',
            f'--output={init_file}',
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        check=True,
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
      proc = subprocess.run(
          [
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
          ],
          cwd=REPO,
          env=dict(os.environ, PYTHONPATH=REPO),
          capture_output=True,
          text=True,
      )
      if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
      res = json.loads(proc.stdout.split('RESULTS ', 1)[1].splitlines()[0])
      row[recycler] = res['recycled']
      row['source_on_A'] = res['source']
      row['zero_shot_B'] = res['target_zero_shot']
    results['recycling'][task] = row

  # ---- ensembling
  log('ensembling')
  task = 'toy_heldout_place'
  members = []
  for seed in range(1, args.ensemble_size + 1):
    name = f'place_seed{seed}'
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
  eval_dir = os.path.join(out, 'ensemble', 'eval')
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
  log(f'done in {results["elapsed_s"]} s: {out}/results.json')
  print(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
