"""Where scripts/setup.sh takes torch from: prints the pip arguments that install it, one per line.

With CUDA (an ``nvidia-smi`` on PATH) pip's default index serves the usual CUDA build. Without it the
default index would serve the same multi-GB CUDA build for a pin or an open range, so torch comes
from PyTorch's CPU wheel index when that index answers, and from the default index otherwise
(machines that reach only a mirror of PyPI, or a local wheel house). ``TORCH_INDEX_URL`` forces an
index. Standard library only: it runs before anything is installed.

    python scripts/torch_source.py 2.13.0
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0


def index_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``url``'s torch page answers within ``timeout`` seconds (any HTTP status below 400)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/torch/", method="HEAD"), timeout=timeout) as reply:
            return reply.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def torch_pip_args(version: str, *, has_cuda: bool, forced_index: str | None = None,
                   probe: Callable[[str], bool] = index_answers) -> list[str]:
    """The ``pip install`` arguments for torch ``version`` on this machine (see the module docstring)."""
    requirement = f"torch=={version}"
    if forced_index:
        return [requirement, "--index-url", forced_index]
    if has_cuda or not probe(CPU_INDEX):
        return [requirement]
    return [requirement, "--index-url", CPU_INDEX]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torch_source.py TORCH_VERSION", file=sys.stderr)
        return 2
    pip_args = torch_pip_args(args[0], has_cuda=shutil.which("nvidia-smi") is not None,
                              forced_index=os.environ.get("TORCH_INDEX_URL") or None)
    source = pip_args[pip_args.index("--index-url") + 1] if "--index-url" in pip_args else "the default index"
    print(f"setup: torch {args[0]} from {source}", file=sys.stderr)
    print("\n".join(pip_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
