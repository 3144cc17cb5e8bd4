"""gdn-jax: Gated DeltaNet language models in JAX/Flax NNX under muP."""
__version__ = "0.1.0"
