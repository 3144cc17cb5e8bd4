"""gdn_jax.convert and gdn_jax.safetensors_io on CPU: fla → gdn-jax → fla is bit-exact, the
converted model's forward equals an independent NumPy forward of the fla tensors, errors name
the tensor or field, and a converted run directory loads in the sampler and the trainer.

The fla side is written here from fla's source facts alone (fla-org/flash-linear-attention:
models/gated_deltanet, layers/gated_deltanet.py, modules/conv/short_conv.py), not from
gdn_jax.convert's name map: torch Linear weights are [out, in], the depthwise Conv1d weight is
[C, 1, W] with y_t = Σ_i w[c, 0, i] x_{t−(W−1)+i}.
"""
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from gdn_jax import convert
from gdn_jax import safetensors_io as st
from tests.np_reference import gated_delta_rule_ref

REPO = pathlib.Path(__file__).resolve().parent.parent
BF16 = np.dtype(ml_dtypes.bfloat16)


def fla_config(**overrides) -> dict:
  """A tiny fla GatedDeltaNetConfig as save_pretrained writes it (q_proj square: D = Hk·K)."""
  c = dict(model_type="gated_deltanet", architectures=["GatedDeltaNetForCausalLM"],
           attn_mode="chunk", hidden_size=32, expand_v=2.0, use_gate=True, use_short_conv=True,
           allow_neg_eigval=False, conv_size=4, head_dim=16, num_heads=2, num_v_heads=None,
           max_position_embeddings=2048, hidden_ratio=4, intermediate_size=48,
           hidden_act="swish", num_hidden_layers=2, norm_eps=1e-5, attn=None, use_cache=True,
           pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
           initializer_range=0.02, fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True,
           fuse_linear_cross_entropy=False, use_l2warp=False, vocab_size=64,
           attnres_block_size=None, torch_dtype="float32", transformers_version="4.57.1")
  c.update(overrides)
  return c


def fla_state(cfg: dict, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors with the names and shapes of fla's GatedDeltaNetForCausalLM.state_dict()."""
  r = np.random.default_rng(seed)
  D, Hk, K, L = cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"], cfg["num_hidden_layers"]
  V, H = int(K * cfg["expand_v"]), cfg["num_v_heads"] or Hk
  F, W, vocab = cfg["intermediate_size"], cfg["conv_size"], cfg["vocab_size"]
  n = lambda *shape, std=None: ((std or shape[-1] ** -0.5) * r.standard_normal(shape))
  s = {"model.embeddings.weight": n(vocab, D, std=1.0)}
  for i in range(L):
    p = f"model.layers.{i}."
    s[p + "attn_norm.weight"] = 1 + n(D, std=0.1)
    s[p + "attn.q_proj.weight"] = n(Hk * K, D)
    s[p + "attn.k_proj.weight"] = n(Hk * K, D)
    s[p + "attn.v_proj.weight"] = n(H * V, D)
    s[p + "attn.a_proj.weight"] = n(H, D)
    s[p + "attn.b_proj.weight"] = n(H, D)
    if cfg["use_short_conv"]:
      for name, C in (("q", Hk * K), ("k", Hk * K), ("v", H * V)):
        s[p + f"attn.{name}_conv1d.weight"] = n(C, 1, W, std=0.5)
    s[p + "attn.A_log"] = np.log(r.uniform(1, 16, H))
    s[p + "attn.dt_bias"] = n(H, std=1.0)
    if cfg["use_gate"]:
      s[p + "attn.g_proj.weight"] = n(H * V, D)
    s[p + "attn.o_norm.weight"] = 1 + n(V, std=0.1)
    s[p + "attn.o_proj.weight"] = n(D, H * V)
    s[p + "mlp_norm.weight"] = 1 + n(D, std=0.1)
    s[p + "mlp.gate_proj.weight"] = n(F, D)
    s[p + "mlp.up_proj.weight"] = n(F, D)
    s[p + "mlp.down_proj.weight"] = n(D, F)
  s["model.norm.weight"] = 1 + n(D, std=0.1)
  if not cfg["tie_word_embeddings"]:
    s["lm_head.weight"] = n(vocab, D)
  return {k: np.asarray(v).astype(dtype) for k, v in s.items()}


def write_fla(directory: pathlib.Path, cfg: dict, state: dict, max_shard_bytes=None):
  st.write_checkpoint(directory, state, {"format": "pt"}, max_shard_bytes)
  (directory / "config.json").write_text(json.dumps(cfg))
  return directory


# --- an independent NumPy forward of the fla tensors (float64) ----------------------------------

def _silu(x):
  return x / (1 + np.exp(-x))


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _conv(x_BxTxC, w_Cx1xW):
  """torch depthwise Conv1d, padding W−1, first T outputs, then SiLU."""
  W = w_Cx1xW.shape[-1]
  T = x_BxTxC.shape[1]
  xp = np.pad(x_BxTxC, ((0, 0), (W - 1, 0), (0, 0)))
  return _silu(sum(xp[:, i:i + T] * w_Cx1xW[:, 0, i] for i in range(W)))


def fla_forward_np(s: dict, cfg: dict, tokens):
  f = {k: np.asarray(v, np.float64) for k, v in s.items()}
  eps, K = cfg["norm_eps"], cfg["head_dim"]
  V, Hk = int(K * cfg["expand_v"]), cfg["num_heads"]
  B, T = tokens.shape
  x = f["model.embeddings.weight"][tokens]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = _rms(x, f[p + "attn_norm.weight"], eps)
    lin = lambda name: h @ f[p + name].T
    qkv = []
    for name in ("q", "k", "v"):
      y = lin(f"attn.{name}_proj.weight")
      qkv.append(_conv(y, f[p + f"attn.{name}_conv1d.weight"]) if cfg["use_short_conv"]
                 else _silu(y))
    q, k, v = qkv
    beta = 1 / (1 + np.exp(-lin("attn.b_proj.weight")))
    if cfg["allow_neg_eigval"]:
      beta = 2 * beta
    g = -np.exp(f[p + "attn.A_log"]) * np.logaddexp(0, lin("attn.a_proj.weight")
                                                     + f[p + "attn.dt_bias"])
    o, _ = gated_delta_rule_ref(q.reshape(B, T, Hk, K), k.reshape(B, T, Hk, K),
                                v.reshape(B, T, -1, V), g, beta, use_qk_l2norm=True)
    o = _rms(o, f[p + "attn.o_norm.weight"], eps)
    if cfg["use_gate"]:
      o = o * _silu(lin("attn.g_proj.weight").reshape(o.shape))
    x = x + o.reshape(B, T, -1) @ f[p + "attn.o_proj.weight"].T
    h = _rms(x, f[p + "mlp_norm.weight"], eps)
    x = x + (_silu(lin("mlp.gate_proj.weight")) * lin("mlp.up_proj.weight")) @ \
        f[p + "mlp.down_proj.weight"].T
  h = _rms(x, f["model.norm.weight"], eps)
  head = f["model.embeddings.weight" if cfg["tie_word_embeddings"] else "lm_head.weight"]
  return h @ head.T


@nnx.jit
def logits(model, tokens):
  return model(jnp.asarray(tokens, jnp.int32))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


# --- conversion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact(tmp_path, dtype, tied):
  cfg = fla_config(tie_word_embeddings=tied, num_v_heads=4 if tied else None)
  src = fla_state(cfg, dtype)
  write_fla(tmp_path / "fla", cfg, src)
  config, model = convert.from_fla(tmp_path / "fla")
  assert config.tie_embeddings == tied and config.param_dtype == "float32"
  convert.to_fla(model, tmp_path / "back", dtype=str(np.dtype(dtype)))
  back, metadata = st.read_checkpoint(tmp_path / "back")
  assert metadata == {"format": "pt"}
  assert_same_tensors(back, src)   # tied: no lm_head.weight on either side
  cfg_back = json.loads((tmp_path / "back" / "config.json").read_text())
  for key in ("hidden_size", "num_heads", "head_dim", "expand_v", "num_v_heads", "conv_size",
              "num_hidden_layers", "intermediate_size", "norm_eps", "vocab_size", "use_gate",
              "use_short_conv", "allow_neg_eigval", "tie_word_embeddings", "model_type"):
    assert cfg_back[key] == cfg[key], key
  assert cfg_back["torch_dtype"] == str(np.dtype(dtype))


def test_tensor_functions_round_trip():
  cfg = fla_config(use_gate=False, use_short_conv=False)
  src = fla_state(cfg)
  config = convert.fla_config_to_model_config(cfg)
  params = convert.fla_state_to_params(src, config)
  assert params["blocks.0.mixer.v_proj.kernel"].shape == (32, 64)   # ours [in, out]
  assert "blocks.0.mixer.g_proj.kernel" not in params
  np.testing.assert_array_equal(params["blocks.1.mlp.down_proj.kernel"],
                                src["model.layers.1.mlp.down_proj.weight"].T)
  assert_same_tensors(convert.params_to_fla_state(params, config), src)


def test_conv_layout():
  cfg = fla_config()
  src = fla_state(cfg)
  params = convert.fla_state_to_params(src, convert.fla_config_to_model_config(cfg))
  w = src["model.layers.0.attn.v_conv1d.weight"]            # [C, 1, W]
  ours = params["blocks.0.mixer.v_conv.weight"]             # [W, C]
  assert ours.shape == (4, 64)
  assert ours[3, 5] == w[5, 0, 3] and ours[0, 7] == w[7, 0, 0]


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=True, num_v_heads=4, expand_v=1.0, use_gate=False,
         use_short_conv=False, allow_neg_eigval=True),
], ids=["untied", "tied_gva_nogate_noconv"])
def test_forward_matches_numpy_reference(tmp_path, overrides):
  cfg = fla_config(**overrides)
  src = fla_state(cfg, seed=1)
  write_fla(tmp_path, cfg, src)
  _, model = convert.from_fla(tmp_path, chunk_size=16)
  tokens = np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, 21))
  ours = np.asarray(logits(model, tokens))
  assert rel_err(ours, fla_forward_np(src, cfg, tokens)) < 1e-4


def test_sharded_checkpoint_reads_as_one(tmp_path):
  cfg = fla_config()
  src = fla_state(cfg, BF16)
  files = st.write_checkpoint(tmp_path / "sharded", src, {"format": "pt"}, max_shard_bytes=6000)
  assert len(files) > 3 and (tmp_path / "sharded" / st.INDEX_FILE).is_file()
  (tmp_path / "sharded" / "config.json").write_text(json.dumps(cfg))
  _, model = convert.from_fla(tmp_path / "sharded")
  convert.to_fla(model, tmp_path / "back", dtype="bfloat16", max_shard_bytes=20000)
  assert_same_tensors(st.read_checkpoint(tmp_path / "back")[0], src)


def test_tied_checkpoint_with_equal_lm_head_is_accepted(tmp_path):
  cfg = fla_config(tie_word_embeddings=True)
  src = fla_state(cfg)
  src["lm_head.weight"] = src["model.embeddings.weight"].copy()
  write_fla(tmp_path, cfg, src)
  convert.from_fla(tmp_path)
  src["lm_head.weight"][0, 0] += 1
  with pytest.raises(convert.ConversionError, match="'lm_head.weight' differs"):
    convert.fla_state_to_params(src, convert.fla_config_to_model_config(cfg))


def _state_error(mutate):
  cfg = fla_config()
  src = fla_state(cfg)
  mutate(src)
  with pytest.raises(convert.ConversionError) as e:
    convert.fla_state_to_params(src, convert.fla_config_to_model_config(cfg))
  return str(e.value)


def test_missing_tensor_is_named():
  msg = _state_error(lambda s: s.pop("model.layers.1.attn.k_proj.weight"))
  assert "'model.layers.1.attn.k_proj.weight' is missing" in msg


def test_extra_tensor_is_named():
  msg = _state_error(lambda s: s.update({"model.layers.0.attn.q_conv1d.bias": np.zeros(32)}))
  assert "'model.layers.0.attn.q_conv1d.bias' has no counterpart" in msg


def test_wrong_shape_is_named_with_both_shapes():
  msg = _state_error(lambda s: s.update({"model.layers.0.attn.o_proj.weight": np.zeros((64, 32))}))
  assert "'model.layers.0.attn.o_proj.weight' has shape [64, 32]; expected [32, 64]" in msg


@pytest.mark.parametrize("overrides, field", [
    (dict(attn={"layers": [1], "num_heads": 2}), "`attn`="),
    (dict(attn=[{"layers": [0], "num_heads": 2}]), "`attn`="),
    (dict(attnres_block_size=2), "`attnres_block_size`=2"),
    (dict(hidden_act="powlu"), "`hidden_act`='powlu'"),
    (dict(model_type="gated_deltanet2"), "`model_type`='gated_deltanet2'"),
    (dict(expand_v=1.3), "`expand_v`=1.3"),
    (dict(attn_mode="parallel"), "`attn_mode`='parallel'"),
    (dict(num_v_heads=3), "`num_v_heads`=3"),
    (dict(norm_eps=None), "`norm_eps`=None"),
])
def test_unsupported_fla_config_is_named(overrides, field):
  with pytest.raises(convert.ConversionError, match="supported|expected") as e:
    convert.fla_config_to_model_config(fla_config(**overrides))
  assert field in str(e.value)


def test_missing_size_field_is_named():
  cfg = fla_config()
  del cfg["hidden_size"]
  with pytest.raises(convert.ConversionError, match="`hidden_size` is missing"):
    convert.fla_config_to_model_config(cfg)


def test_fla_defaults_fill_optional_fields():
  cfg = {k: v for k, v in fla_config().items()
         if k in convert.FLA_REQUIRED + ("intermediate_size",)}
  config = convert.fla_config_to_model_config(cfg)
  assert (config.head_v_dim, config.norm_eps, config.conv_size) == (32, 1e-6, 4)
  cfg.pop("intermediate_size")   # fla's GatedMLP: 256·⌈int(32·4·2/3)/256⌉
  assert convert.fla_config_to_model_config(cfg).mlp_hidden == 256


def random_params(model, seed=0):
  """The model with N(0, 0.1²) parameters from NumPy (no jax init to compile)."""
  r = np.random.default_rng(seed)
  shapes = convert.param_shapes(model.config)
  return convert.load_params(model, {k: 0.1 * r.standard_normal(v) for k, v in shapes.items()})


def _model(**fields):
  """A tiny GatedDeltaNetLM's shapes (from_fla's path: no random init is drawn)."""
  from gdn_jax.model import GatedDeltaNetLM, ModelConfig
  config = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, head_k_dim=16,
                       head_v_dim=16, mlp_hidden=48, chunk_size=16, **fields)
  return nnx.eval_shape(lambda: GatedDeltaNetLM(config, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("fields, name", [
    (dict(qk_norm_eps=1e-5), "`qk_norm_eps`=1e-05"),
    (dict(output_norm_eps=1e-3), "`output_norm_eps`=0.001"),
])
def test_unsupported_model_config_is_named(tmp_path, fields, name):
  with pytest.raises(convert.ConversionError, match="supported") as e:
    convert.to_fla(_model(**fields), tmp_path)
  assert name in str(e.value)
  assert not tmp_path.joinpath("model.safetensors").exists()


def test_model_config_field_without_fla_counterpart_is_named():
  """A ModelConfig field this converter does not know (a later feature) is refused unless it
  has its default value."""
  import dataclasses
  from gdn_jax.model import ModelConfig

  @dataclasses.dataclass(frozen=True)
  class Extended(ModelConfig):
    new_feature: int = 0

  assert convert.model_config_to_fla_config(Extended())["hidden_size"] == 256
  with pytest.raises(convert.ConversionError, match="`new_feature`=3 has no counterpart"):
    convert.model_config_to_fla_config(Extended(new_feature=3))


def test_mup_multipliers_refused_or_folded(tmp_path):
  """μP at twice its base width has Linear/embedding multipliers: refused unless folded; the
  folded export computes the same logits."""
  from gdn_jax import mup
  from gdn_jax.model import ModelConfig
  kw = dict(vocab_size=64, num_layers=1, num_heads=2, head_k_dim=16, head_v_dim=16,
            chunk_size=16)
  config = ModelConfig(d_model=64, mlp_hidden=96, tie_embeddings=True, **kw)
  base = ModelConfig(d_model=32, mlp_hidden=48, tie_embeddings=True, **kw)
  model = random_params(nnx.eval_shape(lambda: mup.build_model(
      config, parametrization="mup", base_config=base, rngs=nnx.Rngs(0))))
  fold, refuse = convert.forward_multipliers(model)
  assert fold and not refuse
  with pytest.raises(convert.ConversionError, match="forward multipliers.*fold_multipliers"):
    convert.to_fla(model, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()
  convert.to_fla(model, tmp_path / "folded", fold_multipliers=True)
  _, back = convert.from_fla(tmp_path / "folded", chunk_size=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
  assert rel_err(logits(back, tokens), logits(model, tokens)) < 1e-5
  at_base = nnx.eval_shape(lambda: mup.build_model(base, parametrization="mup",
                                                   rngs=nnx.Rngs(0)))
  assert convert.forward_multipliers(at_base) == ({}, [])


def test_to_fla_refuses_existing_checkpoint(tmp_path):
  model = random_params(_model())
  convert.to_fla(model, tmp_path)
  with pytest.raises(st.SafetensorsError, match="already holds model.safetensors"):
    convert.to_fla(model, tmp_path)


# --- run directories and the CLI ----------------------------------------------------------------

def test_run_directory_round_trip(tmp_path):
  """--from_fla writes a run that the sampler loads and the trainer restores; --to_fla of it gives
  the fla tensors back bit for bit (through the CLI)."""
  from configs import tiny
  from gdn_jax import checkpoint as ckpt
  from gdn_jax import sample
  from gdn_jax.data import pipeline, prepare
  from gdn_jax.train import config as config_lib
  cfg = fla_config(vocab_size=256, bos_token_id=7)
  src = fla_state(cfg, BF16)
  write_fla(tmp_path / "fla", cfg, src)
  template = tiny.get_config()
  template.data.update(seq_len=16, batch_size=2)
  convert.fla_to_run(tmp_path / "fla", tmp_path / "run", template)

  model, step = sample.load_model(tmp_path / "run")
  assert step == 0 and model.config.d_model == 32
  _, direct = convert.from_fla(tmp_path / "fla")
  params = convert.params_of(model)
  assert_same_tensors(params, convert.params_of(direct))

  config = sample.read_config(tmp_path / "run")   # what gdn-train rebuilds and restores
  trained = config_lib.build_model(config)
  tx = config_lib.make_tx(trained, config)
  _, p = nnx.split(trained)
  state = {"params": p, "opt_state": tx.init(p), "step": np.asarray(0, np.int64),
           "rng": np.zeros((2,), np.uint32)}
  it = pipeline.train_iterator(prepare.embedded_corpus()["train"], seed=config.seed,
                               seq_len=16, batch_size=2)
  checkpointer = ckpt.Checkpointer(tmp_path / "run" / "checkpoints")
  restored = checkpointer.restore(0, ckpt.abstract_like(state), it)
  checkpointer.close()
  assert int(restored["step"]) == 0
  np.testing.assert_array_equal(np.asarray(restored["params"]["lm_head"]["kernel"][...]),
                                params["lm_head.kernel"])
  assert "get_config" in (tmp_path / "run" / "config.py").read_text()

  out = subprocess.run([sys.executable, "-m", "gdn_jax.convert", f"--to_fla={tmp_path / 'back'}",
                        f"--workdir={tmp_path / 'run'}", "--dtype=bfloat16"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert_same_tensors(st.read_checkpoint(tmp_path / "back")[0], src)
  cfg_back = json.loads((tmp_path / "back" / "config.json").read_text())
  assert cfg_back["bos_token_id"] == 7 and cfg_back["torch_dtype"] == "bfloat16"

  with pytest.raises(convert.ConversionError, match="already holds checkpoints"):
    convert.fla_to_run(tmp_path / "fla", tmp_path / "run", template)


def test_cli_error_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "gdn_jax.convert", f"--from_fla={tmp_path}",
                        f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().startswith("error:") and "config.json" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


# --- safetensors --------------------------------------------------------------------------------

def test_safetensors_round_trip_all_dtypes(tmp_path):
  r = np.random.default_rng(0)
  tensors = {"f32": r.standard_normal((3, 5)).astype(np.float32),
             "bf16": r.standard_normal((7,)).astype(BF16),
             "f16": r.standard_normal((2, 2, 3)).astype(np.float16),
             "i64": np.arange(5, dtype=np.int64) - 2, "i32": np.arange(4, dtype=np.int32),
             "big_endian": np.arange(3, dtype=">f4"), "scalar": np.float32(3.5),
             "empty": np.zeros((0, 4), np.float32)}
  st.write(tmp_path / "a.safetensors", tensors, {"format": "pt", "note": "x"})
  back, metadata = st.read(tmp_path / "a.safetensors")
  assert metadata == {"format": "pt", "note": "x"}
  assert back["big_endian"].dtype == np.dtype("<f4")
  for name, value in tensors.items():
    value = np.asarray(value)
    assert back[name].shape == value.shape and back[name].dtype == value.dtype.newbyteorder("<")
    np.testing.assert_array_equal(back[name], value)
  raw = (tmp_path / "a.safetensors").read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  assert n % 8 == 0 and header["bf16"]["dtype"] == "BF16" and header["i64"]["dtype"] == "I64"
  for name, info in header.items():   # every tensor aligned to its item size
    if name != "__metadata__":
      assert (8 + n + info["data_offsets"][0]) % st.DTYPES[info["dtype"]].itemsize == 0


def test_safetensors_reads_a_hand_made_file(tmp_path):
  """A file built byte by byte from the format's description (no gdn_jax writer)."""
  a = np.array([[1.0, -2.0]], "<f4").tobytes()
  b = np.array([1.5, 0.25], BF16).tobytes()
  header = {"__metadata__": {"format": "pt"},
            "b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]},
            "a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}}
  raw = json.dumps(header).encode()
  (tmp_path / "m.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + a + b)
  tensors, metadata = st.read(tmp_path / "m.safetensors")
  np.testing.assert_array_equal(tensors["a"], [[1.0, -2.0]])
  np.testing.assert_array_equal(tensors["b"].astype(np.float32), [1.5, 0.25])
  assert metadata == {"format": "pt"}


def test_safetensors_sharded_index(tmp_path):
  tensors = {f"t{i}": np.full((10,), i, np.float32) for i in range(5)}
  files = st.write_checkpoint(tmp_path, tensors, max_shard_bytes=80)
  index = json.loads((tmp_path / st.INDEX_FILE).read_text())
  assert index["metadata"]["total_size"] == 200 and len(files) == 4   # 3 shards + index
  assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
  back, _ = st.read_checkpoint(tmp_path)
  assert_same_tensors(back, tensors)
  index["weight_map"]["t9"] = "model-00001-of-00003.safetensors"
  (tmp_path / st.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(st.SafetensorsError, match="'t9'"):
    st.read_checkpoint(tmp_path)


def test_safetensors_rejects_bad_files(tmp_path):
  st.write(tmp_path / "ok.safetensors", {"x": np.zeros((4,), np.float32)})
  raw = (tmp_path / "ok.safetensors").read_bytes()
  (tmp_path / "short.safetensors").write_bytes(raw[:-4])
  with pytest.raises(st.SafetensorsError, match="'x' has data_offsets"):
    st.read(tmp_path / "short.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
  with pytest.raises(st.SafetensorsError, match="header length"):
    st.read(tmp_path / "junk.safetensors")
  with pytest.raises(st.SafetensorsError, match="complex64"):
    st.write(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})


def test_lm_head_init_std_is_init_only_and_exports():
  """`lm_head_init_std` shapes the init draw only: a model trained with it exports to the same
  fla config as one without."""
  from gdn_jax.model import ModelConfig
  assert (convert.model_config_to_fla_config(ModelConfig(lm_head_init_std=0.08))
          == convert.model_config_to_fla_config(ModelConfig()))


@pytest.mark.parametrize("field,value", [("loss_chunk_size", 64), ("fuse_projections", True),
                                         ("conv_impl", "pallas")])
def test_compute_knobs_export_like_the_default(field, value):
  """How a model is computed (the fused loss's chunk, one product for the projections, the
  conv's kernel) is not part of its checkpoint: such a model exports to the same fla config."""
  from gdn_jax.model import ModelConfig
  assert (convert.model_config_to_fla_config(ModelConfig(**{field: value}))
          == convert.model_config_to_fla_config(ModelConfig()))
