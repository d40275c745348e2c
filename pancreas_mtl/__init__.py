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


def config_part_subdir(run_dir: str) -> str:
    """Where Hydra saves this start's config in the run folder ``run_dir`` (``hydra.output_subdir`` of
    conf/train.yaml): ``.hydra`` for the first, ``.hydra/resume-<N>`` (N = 1, 2, ...) for each later start
    in the same folder (a resume, a requeued job), so the first part's ``.hydra/config.yaml`` is never
    replaced."""
    from pathlib import Path

    hydra_dir = Path(run_dir) / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        return ".hydra"
    numbers = [int(path.name[len("resume-"):]) for path in hydra_dir.glob("resume-*")
               if path.name[len("resume-"):].isdigit()]
    return f".hydra/resume-{max(numbers, default=0) + 1}"


def _register_resolvers() -> None:
    """``${cwd:}``: the launch directory, resolvable before Hydra sets its runtime config (sweepers
    need it); ``${cpu_precision:}``: see :func:`cpu_precision`; ``${config_part_subdir:<run folder>}``:
    see :func:`config_part_subdir` (cached: every read in one start names the same folder, though the
    config written there changes the answer)."""
    import os

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)
    if not OmegaConf.has_resolver("cpu_precision"):
        OmegaConf.register_new_resolver("cpu_precision", cpu_precision, use_cache=True)
    if not OmegaConf.has_resolver("config_part_subdir"):
        OmegaConf.register_new_resolver("config_part_subdir", config_part_subdir, use_cache=True)


_register_resolvers()
