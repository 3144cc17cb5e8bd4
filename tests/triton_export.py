"""Lowering a Pallas (Triton) kernel for an abstract NVIDIA H100, on CPU: what interpret mode cannot
check (Triton's rules on blocks and ops, the launch's grid and warps). Triton IR → PTX happens in
XLA's GPU compiler and needs a GPU (the experiments' benchmarks run it)."""
import jax

TRITON_CALL = "__gpu$xla.gpu.triton"   # the custom call of each Triton launch in the module


def export_for_h100(fn, *args) -> str:
  """The StableHLO text of jax.jit(fn) exported for CUDA on one abstract H100, for `args`
  (jax.ShapeDtypeStruct or arrays)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)
  triton = jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
        *args).mlir_module()


def triton_launch(text: str, name: str) -> tuple[tuple[int, int, int], int, int]:
  """(grid, num_stages, num_warps) of the Triton launch named `name` in an exported module."""
  i = text.index(f'name = "{name}"')
  config = text[text.rindex("mhlo.backend_config", 0, i):text.index("}", i)]
  field = lambda key: int(config.split(f"{key} = ")[1].split(" ")[0])
  return ((field("grid_x"), field("grid_y"), field("grid_z")), field("num_stages"),
          field("num_warps"))
