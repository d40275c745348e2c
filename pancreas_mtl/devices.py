"""Where the work runs: the torch device and its TF32 switch (training and prediction), and worker
processes over many cases with a progress bar (preprocessing, fingerprinting, evaluation, generation)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise torch's device of that name."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_tf32(enabled: bool | None) -> None:
    """TF32 for float32 matmuls and convolutions on Ampere+ GPUs (None: leave torch's setting).

    Uses torch's legacy switches on purpose: Lightning reads ``torch.get_float32_matmul_precision()``, which
    raises once the newer ``fp32_precision`` API has been mixed in.
    """
    if enabled is None:
        return
    import torch

    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def _limit_threads() -> None:
    # Each worker handles one case at a time; letting every worker spawn a thread per core
    # oversubscribes the machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def map_with_progress(function: Callable[..., Any], arguments: Sequence[tuple], *, num_workers: int = 0,
                      desc: str = "", progress: bool = True) -> list[Any]:
    """``[function(*args) for args in arguments]``, in order, over ``num_workers`` processes (0: inline).

    On Linux workers are forked (a spawned worker re-imports the entry script, lightning and all,
    about ten seconds each here); torch resets its thread pool in a forked child, and each worker
    is limited to one thread so the workers do not oversubscribe the cores.
    """
    arguments = list(arguments)
    bar = tqdm(total=len(arguments), desc=desc, unit="case", disable=not progress or not arguments)
    results: list[Any] = []
    if num_workers <= 0 or len(arguments) <= 1:
        for args in arguments:
            results.append(function(*args))
            bar.update()
        bar.close()
        return results
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=min(num_workers, len(arguments)), mp_context=context,
                             initializer=_limit_threads) as pool:
        futures = [pool.submit(function, *args) for args in arguments]
        for future in futures:
            results.append(future.result())
            bar.update()
    bar.close()
    return results
