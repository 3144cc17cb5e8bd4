"""python -m gdn_jax.convert: --from_fla=DIR --workdir=OUT, or --to_fla=OUT --workdir=RUN."""
import json

from gdn_jax.convert.fla import EXPORT_DTYPES, ConversionError
from gdn_jax.convert.rundir import default_template, fla_to_run, run_to_fla


def main(argv):
  from gdn_jax.train.cli import cli_main  # pylint: disable=import-outside-toplevel

  def run(f):
    if bool(f.from_fla) == bool(f.to_fla):
      raise ConversionError(f"--from_fla={f.from_fla!r}, --to_fla={f.to_fla!r}; expected "
                            "exactly one of them.")
    if f.from_fla:
      template = f.config
      if template is None:
        template = default_template()
      return fla_to_run(f.from_fla, f.workdir, template)
    max_bytes = int(f.max_shard_mb * 2 ** 20) if f.max_shard_mb else None
    files = run_to_fla(f.workdir, f.to_fla, step=f.step, dtype=f.dtype or None,
                       fold_multipliers=f.fold_multipliers, max_shard_bytes=max_bytes)
    return {"files": [str(p) for p in files]}

  print(json.dumps(cli_main(argv, run)), flush=True)


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("from_fla", None, "fla checkpoint directory (config.json, "
                      "model.safetensors) to convert into the run directory --workdir.")
  flags.DEFINE_string("to_fla", None, "Directory to write the fla checkpoint of run --workdir.")
  flags.DEFINE_string("workdir", None, "gdn_jax.train run directory (written or read).")
  config_flags.DEFINE_config_file("config", None, "--from_fla: training config file for the "
                                  "run's non-model fields (default: configs/tiny.py).")
  flags.DEFINE_integer("step", None, "--to_fla: checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", "", ["", *EXPORT_DTYPES], "--to_fla: tensor dtype (default: the "
                    "parameters').")
  flags.DEFINE_bool("fold_multipliers", False, "--to_fla: fold μP forward multipliers into the "
                    "weights instead of refusing them.")
  flags.DEFINE_float("max_shard_mb", 0.0, "--to_fla: shard size limit in MiB (0: one file).")
  flags.mark_flags_as_required(["workdir"])


def cli():
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
