"""Gin helpers with T5X's names: flag rewriting, parsing with search paths, config summaries."""

import logging
import os
import re
import sys
from typing import List, Optional, Sequence

import gin
from gin import config as gin_config

import prompt_tuning


def default_search_paths() -> Sequence[str]:
  """`configs/` of a clone and of an installed package, so `include 'runs/...'` works without flags."""
  here = os.path.dirname(os.path.abspath(prompt_tuning.__file__))
  paths = [os.path.join(os.path.dirname(here), 'configs'), os.path.join(here, 'configs')]
  try:
    import prompt_tuning.configs as installed  # pylint: disable=g-import-not-at-top

    paths.append(os.path.dirname(os.path.abspath(installed.__file__)))
  except ImportError:
    pass
  seen, out = set(), []
  for p in paths:
    if os.path.isdir(p) and p not in seen:
      seen.add(p)
      out.append(p)
  return out


def _package_file_exists(path: str) -> bool:
  """gin's check for `package/file.gin` on the Python path, safe for namespace packages.

  gin 0.5 reads `models/x.gin` as file `x.gin` of a Python package `models`; a plain `models/`
  directory on `sys.path` (say, in the directory `python -m prompt_tuning.train` runs from) is a
  namespace package without a file location, and gin's check then fails with a TypeError instead
  of moving on to the search paths.
  """
  from gin import resource_reader  # pylint: disable=g-import-not-at-top

  try:
    return resource_reader.system_path_file_exists(path)
  except TypeError:
    return False


def _guard_package_reader() -> None:
  from gin import resource_reader  # pylint: disable=g-import-not-at-top

  readers = gin_config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if exists is resource_reader.system_path_file_exists:
      readers[i] = (reader, _package_file_exists)


# T5X's gin files bind `train_script.train` (`import __main__ as train_script`); its users write the
# same scope on the command line, where no import statement names `__main__`.
SCRIPT_ALIASES = (
    ('train_script.train.', 'train.'),
    ('eval_script.evaluate.', 'evaluate.'),
    ('infer_script.infer.', 'infer.'),
)


def forget_stale_registrations() -> List[str]:
  """Makes a reading of gin files in a long-lived process behave as in a fresh one.

  Gin registers the names of `from __gin__ import dynamic_registration` files on first use and
  keeps them for the life of the process, keyed by the function or class found. Two readings in one
  process (the sweep check, then a run's vectorized job; a test after another; a notebook re-running
  a cell) then differ from two fresh processes:
  - `import __main__ as train_script` resolves to whatever `train` `__main__` holds now; a
    registration of an earlier `__main__.train` makes the next reading fail with "A different
    configurable matching 'train_script.train' already exists". Such a stale registration is always
    dropped.
  - A class registered earlier under another alias is not registered again under the alias of the
    new files, so a plain (non-dynamic) file of the same configuration that names the alias, as
    T5X's `tiny.gin` does with `network.T5Config`, fails with "No configurable matching reference".
    When no configuration is bound (after `gin.clear_config()`), every dynamic registration is
    dropped, so the files register their names again exactly as in a fresh process.
  Returns the selectors dropped.
  """
  main = sys.modules.get('__main__')
  registry = gin_config._REGISTRY  # pylint: disable=protected-access
  inverse = gin_config._INVERSE_REGISTRY  # pylint: disable=protected-access
  stale = []
  for alias, _ in SCRIPT_ALIASES:
    selector = alias.rstrip('.')
    info = registry.get(selector)
    if info is not None and info.wrapped is not getattr(main, selector.split('.')[-1], None):
      stale.append(selector)
  if not gin_config._CONFIG:  # pylint: disable=protected-access
    stale += [sel for sel, info in registry.items() if info.import_source is not None]
  dropped = []
  for selector in dict.fromkeys(stale):
    info = registry.pop(selector)
    if inverse.get(info.wrapped) is info:
      del inverse[info.wrapped]
    dropped.append(selector)
  return dropped


def _resolve_script_alias(binding: str) -> str:
  """`train_script.train.x = 1` -> `train.x = 1` (likewise `eval_script`, `infer_script`)."""
  stripped = binding.lstrip()
  for alias, name in SCRIPT_ALIASES:
    if stripped.startswith(alias):
      return name + stripped[len(alias) :]
  return binding


def rewrite_gin_args(args: Sequence[str]) -> Sequence[str]:
  """Turns `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (T5X's shorthand)."""
  out = []
  for arg in args:
    m = re.match(r'^--gin\.([^=]+)=(.*)$', arg, re.S)
    if m:
      out.append(f'--gin_bindings={m.group(1)} = {m.group(2)}')
    else:
      out.append(arg)
  return out


class _GinSearchNoise(logging.Filter):
  """Drops gin's per-search-path 'Path not found' lines (they look like errors but are not)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'resource_reader' not in (record.pathname or '')


class GinConfigError(ValueError):
  """A gin file or binding could not be parsed."""


class UnusedMacroError(GinConfigError):
  """A macro is set that no binding references (a typo would silently leave the default)."""


_MACRO_DEF = re.compile(r'^([A-Z_][A-Z0-9_]*)\s*=', re.M)
_KNOWN_MACROS: Optional[set] = None


def known_macros() -> set:
  """Macro names defined by the shipped gin files (`configs/`)."""
  global _KNOWN_MACROS
  if _KNOWN_MACROS is None:
    names = set()
    for root in default_search_paths():
      for dirpath, _, files in os.walk(root):
        for name in files:
          if name.endswith('.gin'):
            with open(os.path.join(dirpath, name)) as f:
              names.update(_MACRO_DEF.findall(f.read()))
    _KNOWN_MACROS = names
  return _KNOWN_MACROS


def _macro_references(value, out: set) -> None:
  if isinstance(value, gin.config.ConfigurableReference):
    if value.selector == 'gin.macro' and value.scopes:
      out.add(value.scopes[-1])
  elif isinstance(value, dict):
    for v in list(value.keys()) + list(value.values()):
      _macro_references(v, out)
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _macro_references(v, out)


def check_macros(gin_bindings: Sequence[str] = ()) -> None:
  """Fails on a macro that is set but referenced by no binding, unless the shipped configs define it.

  `--gin.BATCHSIZE=4` or `TRAIN_STEP = 5` in a gin file would otherwise train with the defaults
  without a word. A macro the shipped configs define (e.g. EVAL_PERIOD passed to `infer` as well)
  only gets a warning. Entry points skip the check with `--allow_unused_macros`.

  Raises:
    UnusedMacroError: naming the macro, where it was set and the closest referenced names.
  """
  try:
    config = gin.config._CONFIG  # pylint: disable=protected-access
    defined = [scope for (scope, selector) in config if selector == 'gin.macro' and scope]
    referenced: set = set()
    for params in config.values():
      _macro_references(dict(params), referenced)
  except (AttributeError, TypeError):  # Another gin version: skip the check.
    return
  unused = [m for m in defined if m not in referenced]
  if not unused:
    return
  known = known_macros()
  unknown = [m for m in unused if m not in known]
  on_command_line = lambda m: any(re.match(rf'\s*{re.escape(m)}\s*=', b) for b in gin_bindings)
  for m in unused:
    if m in known and on_command_line(m):
      logging.getLogger(__name__).warning('Macro %s is set but not used by this configuration.', m)
  if not unknown:
    return
  import difflib  # pylint: disable=g-import-not-at-top

  candidates = sorted(referenced | known)
  problems = []
  for m in unknown:
    where = 'on the command line' if on_command_line(m) else 'in a gin file'
    close = difflib.get_close_matches(m, candidates, n=3, cutoff=0.6)
    hint = f' (did you mean {" or ".join(close)}?)' if close else ''
    problems.append(f'{m}, set {where},{hint}')
  raise UnusedMacroError(
      f'Macro(s) set but used by no binding: {"; ".join(problems)}. A misspelled macro leaves the '
      'default in place. Fix the name, or pass --allow_unused_macros if the extra macro is '
      'deliberate.'
  )


def parse_gin_flags(
    gin_search_paths: Sequence[str],
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    skip_unknown: bool = False,
    finalize_config: bool = True,
    allow_unused_macros: bool = True,
) -> None:
  """Parses gin files and bindings, with clear errors for unknown names and missing files.

  T5X's script scopes (`train_script.train.x = ...`) are accepted in bindings. With
  `allow_unused_macros=False` (the entry points' default) a macro that nothing references is an
  error (`check_macros`).
  """
  gin_bindings = [_resolve_script_alias(b) for b in gin_bindings]
  forget_stale_registrations()
  _guard_package_reader()
  for path in list(gin_search_paths) + list(default_search_paths()):
    for p in str(path).split(','):
      if p:
        gin.add_config_file_search_path(p)
  noise = _GinSearchNoise()
  logging.getLogger().addFilter(noise)
  try:
    gin.parse_config_files_and_bindings(
        list(gin_files),
        list(gin_bindings),
        skip_unknown=skip_unknown,
        finalize_config=finalize_config,
    )
  except (ValueError, IOError, OSError, AttributeError, ImportError, SyntaxError) as e:
    msg = str(e)
    if isinstance(e, ImportError):
      hint = (
          'a module imported by a gin file (or MIXTURE_OR_TASK_MODULE) could not be imported: check the '
          'module path and that its package is installed / on PYTHONPATH.'
      )
    elif isinstance(e, SyntaxError):
      hint = 'fix the gin syntax at the reported file and line.'
    elif (
        'No configurable matching' in msg
        or 'No configurable' in msg
        or "Couldn't resolve selector" in msg
        or 'has no attribute' in msg
    ):
      hint = (
          'a gin name is unknown: check its spelling and that the gin file imports the module that '
          'defines it (e.g. `from prompt_tuning.runtime import utils`).'
      )
    elif "doesn't have a parameter" in msg or 'has no parameter' in msg or 'not a parameter' in msg:
      hint = (
          'a bound parameter name is unknown: check its spelling against the signature of the '
          'configurable named in the message.'
      )
    elif 'Unable to find' in msg and 'include' in msg.lower():
      hint = (
          f'an included gin file was not found; search paths: '
          f'{list(gin_search_paths) + list(default_search_paths())}.'
      )
    elif 'Unable to open file' in msg or 'No such file' in msg or 'not found' in msg.lower():
      hint = (
          f'a gin file was not found; search paths: {list(gin_search_paths) + list(default_search_paths())}. '
          'Pass --gin_search_paths=DIR or use a path relative to configs/.'
      )
    elif 'MACRO' in msg.upper() or 'REQUIRED' in msg:
      hint = 'a required macro is unset: pass it with --gin.NAME=VALUE.'
    else:
      hint = 'check the gin syntax near the reported line.'
    lines = [l for l in msg.splitlines() if l.strip()]
    where = [
        l.strip()
        for l in lines[1:]
        if l.strip().startswith('In file') or l.strip().startswith('In bindings')
    ]
    text = lines[0] if lines else repr(e)
    if where:
      text += f' ({where[0]})'
    raise GinConfigError(f'Could not parse the gin configuration: {text}\nHint: {hint}') from e
  finally:
    logging.getLogger().removeFilter(noise)
  if not allow_unused_macros:
    check_macros(gin_bindings)


def summarize_gin_config(model_dir: str, summary_writer=None, step: int = 0) -> None:
  """Writes the operative config to `MODEL_DIR/config.gin` (and as TensorBoard text)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  config_str = gin.operative_config_str()
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(os.path.join(model_dir, 'config.gin'), 'w') as f:
    f.write(config_str)
  if summary_writer is not None:
    with summary_writer.as_default():
      tf.summary.text(
          'gin/operative_config',
          gin.markdown(config_str) if hasattr(gin, 'markdown') else config_str,
          step=step,
      )
    summary_writer.flush()


def run(main, argv: Optional[Sequence[str]] = None) -> None:
  """`absl.app.run` after rewriting `--gin.NAME=VALUE` flags."""
  from absl import app  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv if argv is None else argv)
  app.run(main, argv=[argv[0]] + list(rewrite_gin_args(argv[1:])))
