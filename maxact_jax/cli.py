"""`maxact-jax <command> [--flags]`: the absl entry point.

Parses the flags of one command and calls its `run()`. Bad input of any kind
ends as one line `error: ...` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

from maxact_jax.commands import common
from maxact_jax.errors import UserError

COMMANDS = {
    'measure': ('maxact_jax.commands.measure', 'measure every tap of a checkpoint on a corpus'),
    'crosscheck': ('maxact_jax.commands.crosscheck', 'compare every tap against transformers (PyTorch)'),
    'report': ('maxact_jax.commands.report', 'cross-model report with plots from results files'),
    'corpus': ('maxact_jax.commands.corpus', 'write the built-in corpus as JSON lines'),
    'bootstrap': ('maxact_jax.commands.bootstrap', 'write category-stratified random subsets of a corpus'),
    'quant': ('maxact_jax.commands.quant', 'INT8/FP8 fake-quantization error at the peak (or chosen) taps'),
    'sweep': ('maxact_jax.commands.sweep', 'measure a list of configs (skipping finished ones), then report'),
    'convert': ('maxact_jax.commands.convert', 'convert a checkpoint once to an orbax model directory'),
    'bench': ('maxact_jax.commands.bench', 'statistics overhead, speed, and the PyTorch pipeline, in one run'),
    'plan': ('maxact_jax.commands.plan', 'size a run from config.json: parameters, taps, memory, layout'),
    'anatomy': ('maxact_jax.commands.anatomy', 'outlier channels, the tokens that carry them, and their views'),
    'intervene': ('maxact_jax.commands.intervene', 'replace residual channels; the change in loss and KL'),
    'qeval': ('maxact_jax.commands.qeval', 'quantize every linear layer per scheme; loss and KL against unquantized'),
}
EXIT_USAGE = 2


def usage() -> str:
  width = max(len(c) for c in COMMANDS)
  lines = ['usage: maxact-jax <command> [--flag=value ...]', '', 'commands:']
  lines += [f'  {name:<{width}}  {help_}' for name, (_, help_) in COMMANDS.items()]
  lines += ['', 'maxact-jax <command> --help lists the flags of a command.']
  return '\n'.join(lines)


def fail(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(usage())
    return 0 if len(argv) >= 2 else EXIT_USAGE
  name = argv[1]
  if name not in COMMANDS:
    return fail(f'unknown command {name!r} (commands: {", ".join(COMMANDS)})')
  module = importlib.import_module(COMMANDS[name][0])
  fv: flags.FlagValues = module.FLAGS
  if any(a in ('-h', '--help', '-help') for a in argv[2:]):
    print(f'maxact-jax {name}: {COMMANDS[name][1]}\n')
    print(fv.get_help(include_special_flags=False))
    return 0
  try:
    fv.unparse_flags()  # main() may run several times in one process (tests)
    fv([f'maxact-jax {name}'] + argv[2:])
  except flags.Error as e:
    return fail(str(e).splitlines()[0])
  if 'jax' in sys.modules:  # the command computes with JAX
    common.enable_compilation_cache()
  try:
    return int(module.run() or 0)
  except UserError as e:
    return fail(str(e))
  except KeyboardInterrupt:
    return fail('interrupted')


def entry() -> None:
  sys.exit(main())


if __name__ == '__main__':
  entry()
