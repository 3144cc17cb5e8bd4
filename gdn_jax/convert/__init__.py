"""Checkpoint conversion between fla's GatedDeltaNetForCausalLM (Hugging Face layout) and
GatedDeltaNetLM (docs/convert.md).

    fla.py       the name map, layouts, config fields, μP multipliers; from_fla / to_fla
    rundir.py    an fla checkpoint ↔ a gdn_jax.train run directory
    __main__.py  python -m gdn_jax.convert --from_fla=DIR --workdir=OUT | --to_fla=OUT --workdir=RUN
"""
from gdn_jax.convert.fla import (COMPUTE_FIELDS, EXPORT_DTYPES, FLA_ARCHITECTURE, FLA_ATTN_MODES,
                                 FLA_DEFAULTS, FLA_MODEL_TYPE, FLA_QK_NORM_EPS, FLA_REQUIRED,
                                 ConversionError, fla_config_to_model_config,
                                 fla_state_to_params, forward_multipliers, from_fla,
                                 load_params, model_config_to_fla_config, model_from_params,
                                 name_map, param_shapes, params_of, params_to_fla_state,
                                 read_fla_config, to_fla)
from gdn_jax.convert.rundir import default_template, fla_to_run, run_config, run_to_fla
