"""Pallas kernels for the chunked gated delta rule (GPU and TPU), with custom VJPs."""
