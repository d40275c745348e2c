"""pancreas_mtl: multi-task 3D CT segmentation (pancreas, lesion) and lesion subtype classification."""

__version__ = "0.1.0"


def cpu_precision() -> str:
    """Lightning precision for training on this CPU: "bf16-mixed" where it computes bfloat16 natively
    (x86 flags avx512_bf16 or amx_bf16; the demo's steps ran 1.6x faster so on an AMD EPYC, see
    docs/benchmarks.md), else "32-true" (emulated bfloat16 is slower than float32)."""
    try:
        with open("/proc/cpuinfo") as stream:
            flags = {flag for line in stream if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return "32-true"
    return "bf16-mixed" if flags & {"avx512_bf16", "amx_bf16"} else "32-true"


def _register_resolvers() -> None:
    """``${cwd:}``: the launch directory, resolvable before Hydra sets its runtime config (sweepers
    need it); ``${cpu_precision:}``: see :func:`cpu_precision`."""
    import os

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)
    if not OmegaConf.has_resolver("cpu_precision"):
        OmegaConf.register_new_resolver("cpu_precision", cpu_precision, use_cache=True)


_register_resolvers()
