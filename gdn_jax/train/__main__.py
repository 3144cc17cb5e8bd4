from gdn_jax.train.cli import cli

cli()
