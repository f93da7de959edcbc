"""`python run_methods_e2e.py SPEC.json`: `prompt_tuning.train`, `.eval`, `.infer`, per method.

The end-to-end test of the methods (`test_methods_e2e.py`) runs every method's training and its
evaluation from the saved artifact in this one process, one after the other, exactly as
`python -m prompt_tuning.train` / `python -m prompt_tuning.eval` do (gin files parsed with the
same search paths, `train` / `evaluate` / `infer` bound as `__main__.train` / `__main__.evaluate`
/ `__main__.infer`), so the imports (TensorFlow, seqio, JAX) are paid once; the composed methods'
test (`test_composed_e2e.py`) serves its runs the same way (`infer` only). `SPEC.json` is a list
of `{"name", "train": [gin files, bindings], "eval": [...], "infer": [...]}` (each stage
optional, run in that order; with `"check_macros": true` a macro nothing uses is an error, as
in the entry points); each stage's outcome (exit status and error) goes to
`<name>.<stage>.json` next to the spec.
"""

import json
import os
import sys
import traceback

import gin

from prompt_tuning.runtime import gin_utils
from prompt_tuning.runtime.eval import evaluate  # pylint: disable=unused-import
from prompt_tuning.runtime.infer import infer  # pylint: disable=unused-import
from prompt_tuning.runtime.train import train  # pylint: disable=unused-import

# As `prompt_tuning.train.main` / `prompt_tuning.eval.main`: registered before any gin parsing.
_CONFIGURABLES = {
    'train': gin.configurable(train),
    'eval': gin.configurable(evaluate),
    'infer': gin.configurable(infer),
}


def _run(stage: str, files, bindings, check_macros: bool = False) -> None:
  gin.clear_config()
  gin_utils.parse_gin_flags([], files, bindings, allow_unused_macros=not check_macros)
  _CONFIGURABLES[stage]()  # pylint: disable=no-value-for-parameter


def main(spec_path: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.experimental.set_visible_devices([], 'GPU')
  with open(spec_path) as f:
    spec = json.load(f)
  out_dir = os.path.dirname(os.path.abspath(spec_path))
  for case in spec:
    for stage in [s for s in _CONFIGURABLES if s in case]:
      result = {'ok': True}
      try:
        _run(stage, *case[stage], check_macros=case.get('check_macros', False))
      except Exception as e:  # pylint: disable=broad-except
        result = {
            'ok': False,
            'error': f'{type(e).__name__}: {e}',
            'traceback': traceback.format_exc(),
        }
      with open(os.path.join(out_dir, f'{case["name"]}.{stage}.json'), 'w') as f:
        json.dump(result, f)
      print(f'{case["name"]} {stage}: {"ok" if result["ok"] else result["error"]}', flush=True)
      if not result['ok']:
        break


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  main(sys.argv[1])
