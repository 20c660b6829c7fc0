"""`maxact-jax measure`: every tap of a checkpoint on a corpus, in the reference's schema."""

from __future__ import annotations

import json

from absl import flags

from maxact_jax import anatomy, crosscheck, data, fixtures, measure, parallel
from maxact_jax.commands import common
from maxact_jax.errors import UserError

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
common.define_data_flags(FLAGS)
flags.DEFINE_string('output_dir', 'runs/measure', 'Results go to <output_dir>/json/.', flag_values=FLAGS)
flags.DEFINE_boolean('progress', True, 'Show a progress bar with tokens/s.', flag_values=FLAGS)
flags.DEFINE_integer('checkpoint_every', 0, 'Save a resumable state under <output_dir>/state/ every N '
                     'batches (0: never).', flag_values=FLAGS)
flags.DEFINE_boolean('resume', False, 'Continue from the state saved by --checkpoint_every (refused if the '
                     'checkpoint, corpus or batching flags differ).', flag_values=FLAGS)
flags.DEFINE_float('device_memory_gb', None, 'Memory of one device for the memory guard (default: what '
                   'the device reports; the host memory on CPU).', flag_values=FLAGS)
flags.DEFINE_string('source_tokenizer', None, 'Tokenizer (directory or tokenizer.json) that made the '
                    'input_ids of --data_path: they are decoded with it and re-encoded with the '
                    "checkpoint's tokenizer, as the paper did from Llama-2 ids.", flag_values=FLAGS)
flags.DEFINE_boolean('crosscheck', False, 'First check every tap against transformers on a sample batch.',
                     flag_values=FLAGS)
flags.DEFINE_enum('demo', 'dense', ('dense', 'moe'), 'Without --model_path: which built-in demo checkpoint '
                  '(built on first use): dense (a planted outlier on BOS) or moe (its qwen3_moe sibling).',
                  flag_values=FLAGS)
flags.DEFINE_integer('max_shapes', 8, 'At most this many distinct padded batch lengths (one compilation '
                     'each).', flag_values=FLAGS)
flags.DEFINE_integer('shape_cost_tokens', data.SHAPE_COST_TOKENS, 'A batch length beyond the first is used only '
                     'if it saves more than this many padded tokens (what its compilation costs); 0: always '
                     'the least padding within --max_shapes.', flag_values=FLAGS)
flags.DEFINE_enum('parallelism', parallel.AUTO, parallel.PARALLELISMS,
                  'none: one device. pmap: parameters replicated, the batch split over every device, statistics '
                  'combined with collectives in the step. mesh: parameters sharded (--mesh_shape), the batch on '
                  'the data and fsdp axes. auto: none on one device, else pmap when the model fits one device, '
                  'mesh otherwise (it says which and why).', flag_values=FLAGS)
flags.DEFINE_string('mesh_shape', None, 'Mesh axis sizes for --parallelism=mesh, e.g. data=2,fsdp=4,tensor=1 '
                    '(or 2,4,1); must multiply to the number of devices, one may be -1. Default: fsdp over all.',
                    flag_values=FLAGS)
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 (jax.distributed).',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.', flag_values=FLAGS)
flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0..num_processes-1; process 0 writes.',
                     flag_values=FLAGS)
flags.DEFINE_integer('initialization_timeout', 300, 'Multi-host: seconds to wait for the coordinator and '
                     'the other processes.', flag_values=FLAGS)


def options(fv: flags.FlagValues) -> measure.MeasureOptions:
  """The (checked) MeasureOptions of a parsed measure flag set; `sweep` reads flagfiles with it."""
  common.check_dtype(fv.dtype)
  common.check_positive('batch_size', fv.batch_size, allow_none=False)
  common.check_positive('max_samples', fv.max_samples)
  common.check_positive('max_seq_len', fv.max_seq_len)
  common.check_positive('max_shapes', fv.max_shapes, allow_none=False)
  if fv.shape_cost_tokens < 0:
    raise UserError(f'--shape_cost_tokens must be 0 or positive, got {fv.shape_cost_tokens}')
  if fv.checkpoint_every < 0:
    raise UserError(f'--checkpoint_every must be 0 or positive, got {fv.checkpoint_every}')
  if fv.device_memory_gb is not None and fv.device_memory_gb <= 0:
    raise UserError(f'--device_memory_gb must be positive, got {fv.device_memory_gb}')
  return measure.MeasureOptions(
      model_path=fv.model_path, output_dir=fv.output_dir, data_path=fv.data_path, max_samples=fv.max_samples,
      max_seq_len=fv.max_seq_len, batch_size=fv.batch_size, dtype=fv.dtype, progress=fv.progress,
      checkpoint_every=fv.checkpoint_every, resume=fv.resume, device_memory_gb=fv.device_memory_gb,
      source_tokenizer=fv.source_tokenizer, tokenizer=fv.tokenizer, max_shapes=fv.max_shapes,
      shape_cost_tokens=fv.shape_cost_tokens, parallelism=fv.parallelism,
      mesh_shape=fv.mesh_shape, coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
      process_id=fv.process_id, initialization_timeout=fv.initialization_timeout)


def run() -> int:
  opts = options(FLAGS)
  model_path = opts.model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint(kind=FLAGS.demo)
  if FLAGS.crosscheck:
    if (FLAGS.num_processes or 1) > 1:
      raise UserError('--crosscheck runs in one process: run `maxact-jax crosscheck` before a multi-host measure')
    report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
        model_path=model_path, data_path=FLAGS.data_path, dtype=FLAGS.dtype,
        output_dir=FLAGS.output_dir, max_seq_len=min(FLAGS.max_seq_len or 256, 256), tokenizer=FLAGS.tokenizer))
    print(crosscheck.format_report(report))
    if not report['passed']:
      print('crosscheck failed: not measuring')
      return 1
  m = measure.measure(opts)
  if not m.paths[0]:
    return 0  # another process writes the results
  print(measure.layer_table(m.doc))
  for line in measure.summary_lines(m):
    print(line)
  planted = fixtures.planted_info(model_path)
  if planted:
    print(measure.planted_report(m.doc, planted))
  print(f'results: {m.paths[0]}\n         {m.paths[1]}')
  if m.anatomy_paths:
    with open(m.anatomy_paths[1], encoding='utf-8') as f:
      for line in anatomy.summary_lines(json.load(f))[2:]:  # the outlier channels and the tokens
        print(line)
    print(f'anatomy: {m.anatomy_paths[1]}\n         {m.anatomy_paths[0]}\n'
          f'         views and the token x channel surface: maxact-jax anatomy --model_path={model_path} '
          f'--output_dir={opts.output_dir}')
  return 0
