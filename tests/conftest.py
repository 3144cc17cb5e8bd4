"""Test-session set-up shared by every test module (imported by pytest before them).

The CPU client dispatches asynchronously by default. The Mosaic GPU interpreter (the decode
GEMVs' tests) runs its kernels through `io_callback`s that call JAX ops eagerly; with
asynchronous dispatch such a callback can wait on the runtime thread that waits on it, and a
test hangs for good (seen once on the 2-core CI machine; jax issue 25861 describes the same).
Inline dispatch avoids that. It is read when the CPU client is made, so it is set here, before
any test touches a device.
"""
import jax

jax.config.update("jax_cpu_enable_async_dispatch", False)
