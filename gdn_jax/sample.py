"""Sample text from a checkpoint of a `gdn_jax.train` run.

    python -m gdn_jax.sample --workdir=/tmp/gdn-tiny --prompt="ROMEO:" \
        [--max_new_tokens=300 --temperature=0.8 --top_k=40 --step=N --seed=0]

Rebuilds the model from the run's `config.json` (`gdn_jax.train.build_model`: the same sizes,
parametrization and forward multipliers), restores only its parameters from the latest
checkpoint (or `--step`) with orbax (no optimizer state is read), encodes the prompt with the
byte tokenizer and prints the prompt and its continuation (`gdn_jax.generate.generate`). A missing or incompatible
workdir, a step that was not saved or a bad flag ends with one line `error: ...` and exit status 1.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gdn_jax.data import tokenizer
from gdn_jax.generate import check_sampling, generate

_RUN = "the --workdir of a gdn_jax.train run"


class SampleError(ValueError):
  """A workdir, checkpoint or flag the sampler cannot use (the message says which and why)."""


def read_config(workdir) -> ml_collections.ConfigDict:
  """The run's config from workdir/config.json."""
  from gdn_jax.train.config import read_run_config  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(read_run_config(workdir, SampleError))


def abstract_model(config: ml_collections.ConfigDict, where: str):
  """The run's model as shapes only (no parameters drawn)."""
  try:
    from gdn_jax.train import build_model  # the training code's own config → model
  except ImportError as e:
    raise SampleError(f"gdn_jax.train does not import ({e}); the sampler rebuilds the run's "
                      "model with it (its dependencies, grain included, must be installed).")
  try:
    return nnx.eval_shape(lambda: build_model(config, 0))
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise SampleError(f"{where}: the current code cannot build this run's model: {e}") from None


def checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  """A read-only manager for the `state` item of the run's checkpoints."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def load_model(workdir, step: int | None = None):
  """(model with the parameters of checkpoint `step` (None: the latest), that step)."""
  config = read_config(workdir)
  where = str(pathlib.Path(workdir) / "config.json")
  abstract = abstract_model(config, where)
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise SampleError(f"no checkpoint in {str(directory)!r}; expected {_RUN} that saved at "
                      "least one (every train.checkpoint_every steps and at the end).")
  manager = checkpoint_manager(directory)
  try:
    return _restore(manager, abstract, step, directory, where)
  finally:
    manager.close()


def _restore(manager, abstract, step, directory, where):
  steps = sorted(manager.all_steps())
  if not steps:
    raise SampleError(f"no checkpoint in {str(directory)!r}; expected {_RUN} that saved at "
                      "least one (every train.checkpoint_every steps and at the end).")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise SampleError(f"--step={step} has no checkpoint in {str(directory)!r}; available steps: "
                      f"{', '.join(map(str, steps))}.")
  graphdef, params = nnx.split(abstract)
  mismatch = _mismatch(manager, step, params)
  if mismatch:
    raise SampleError(f"checkpoint {step} in {str(directory)!r} does not fit the model that "
                      f"{where} builds with the current code: {mismatch}.")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)}
  try:  # only "params" of the saved {params, opt_state, step, rng}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
  except Exception as e:  # orbax raises several types for a tree or shape mismatch
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SampleError(f"checkpoint {step} in {str(directory)!r} does not fit the model that "
                      f"{where} builds with the current code ({first[:300]}).") from None
  return nnx.merge(graphdef, restored["state"]["params"]), step


def _shapes(tree) -> dict[str, tuple]:
  """Dotted parameter name → shape ('value' leaves of nnx variables dropped from the names)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    out[".".join(n for n in names if n != "value")] = tuple(leaf.shape)
  return out


def _mismatch(manager, step, params) -> str | None:
  """How the saved parameters differ from `params` in names or shapes (None: they fit, or the
  checkpoint's metadata is unreadable and the restore itself will tell)."""
  try:
    saved = manager.item_metadata(step)["state"]
    saved = _shapes(getattr(saved, "tree", saved)["params"])
  except Exception:  # pylint: disable=broad-except
    return None
  wanted = _shapes(params)
  shape = [f"{n} is {list(saved[n])} in the checkpoint, {list(s)} in the model"
           for n, s in wanted.items() if n in saved and saved[n] != s]
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  parts = shape[:2] + ([f"{len(shape) - 2} more shapes differ"] if len(shape) > 2 else [])
  parts += [f"not in the checkpoint: {', '.join(missing[:3])}"] if missing else []
  parts += [f"not in the model: {', '.join(extra[:3])}"] if extra else []
  return "; ".join(parts) or None


def sample(workdir, prompt: str, *, max_new_tokens: int = 300, temperature: float = 0.8,
           top_k: int | None = None, step: int | None = None, seed: int = 0) -> str:
  """The prompt and `max_new_tokens` sampled bytes, decoded as UTF-8 text."""
  if not isinstance(prompt, str) or not prompt:
    raise SampleError(f"--prompt={prompt!r} is empty; expected at least one character (decoding "
                      "starts from the prompt's last token).")
  check_sampling(tokenizer.VOCAB_SIZE, max_new_tokens, temperature, top_k, where="sample")
  model, _ = load_model(workdir, step)
  if model.config.vocab_size != tokenizer.VOCAB_SIZE:
    raise SampleError(f"config.model.vocab_size={model.config.vocab_size}; the sampler's byte "
                      f"tokenizer needs {tokenizer.VOCAB_SIZE}.")
  tokens = jnp.asarray(tokenizer.encode(prompt)[None], jnp.int32)
  out = generate(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                 rng=jax.random.key(seed))
  return tokenizer.decode(np.asarray(out[0]))


def main(argv):
  from gdn_jax.train.cli import cli_main  # pylint: disable=import-outside-toplevel
  text = cli_main(argv, lambda f: sample(f.workdir, f.prompt, max_new_tokens=f.max_new_tokens,
                                         temperature=f.temperature, top_k=f.top_k, step=f.step,
                                         seed=f.seed))
  print(text, flush=True)


def define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None,
                      "Run directory of gdn_jax.train (config.json, checkpoints/).")
  flags.DEFINE_string("prompt", None, "Text to continue (UTF-8; byte tokens).")
  flags.DEFINE_integer("max_new_tokens", 300, "Bytes to sample.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", None, "Sample among the k most likely bytes only (default: all).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["workdir", "prompt"])


def cli():
  from absl import app
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
