"""pancreas_mtl: multi-task 3D CT segmentation (pancreas, lesion) and lesion subtype classification."""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """``${cwd:}``: the launch directory, resolvable before Hydra sets its runtime config (sweepers need it)."""
    import os

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)


_register_resolvers()
