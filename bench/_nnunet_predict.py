"""nnU-Net v2's own predictor over a folder, timed; bench/predict_vs_nnunet.py runs it with .venv-nnunet.

Imports only nnU-Net's packages (nnunetv2, its I/O and dynamic-network-architectures) and torch, never
pancreas_mtl. The real ``nnUNetPredictor`` (nnunetv2.inference.predict_from_raw_data) is built as
``nnUNetv2_predict_from_modelfolder`` builds it (Gaussian weighting on, ``tile_step_size``, mirroring
over the checkpoint's ``inference_allowed_mirroring_axes`` unless ``--disable-tta``) and initialised
from the model folder; then every ``{case}_0000.nii.gz`` of ``--input`` is predicted into ``--output``.

Pipelines:

- ``sequential`` (default): ``predict_from_files_sequential`` one case at a time in this process:
  SimpleITK read, its DefaultPreprocessor (crop, CTNormalization, cubic-spline resampling), sliding
  windows, logits resampled back and written. Every case is timed on its own, and the network part
  (``predict_logits_from_preprocessed_data``) separately.
- ``files``: ``predict_from_files`` as the command line runs it, with ``--npp`` preprocessing and
  ``--nps`` export worker processes beside the network; only the folder's total is known.

    .venv-nnunet/bin/python bench/_nnunet_predict.py --model DIR --input DIR --output DIR
        [--step 0.5] [--disable-tta] [--threads 1] [--pipeline sequential|files] [--npp 1 --nps 1]
        [--dump DIR]

``--dump DIR`` (sequential only) also saves each case's preprocessed image ``{case}_data.npy``
(C, Z, Y, X) and stitched logits ``{case}_logits.npy`` (K, Z, Y, X) on the plan's grid, float32, for
predict_vs_nnunet.py to tell preprocessing, windows and export apart; saving is not in the times.

Prints one line ``RESULT {json}`` at the end: seconds of import, initialisation, each case (sequential)
and the folder, and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

PROCESS_START = time.perf_counter()


def set_nnunet_environment(workdir: Path, threads: int) -> None:
    """nnU-Net's paths and process count, before anything of nnunetv2 is imported."""
    for name in ("raw", "preprocessed", "results"):
        folder = workdir / f"nnunet_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault(f"nnUNet_{name}", str(folder))
    # default_num_processes also sets torch's threads around prediction and export (8 unless told)
    os.environ["nnUNet_def_n_proc"] = str(threads)
    os.environ["nnUNet_compile"] = "f"
    os.environ["nnUNet_wandb_enabled"] = "0"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="nnU-Net model folder (plans.json, dataset.json, fold_0/)")
    parser.add_argument("--input", type=Path, required=True, help="folder of {case}_0000.nii.gz")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--fold", default="0")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--step", type=float, default=0.5, help="tile_step_size (nnU-Net's default 0.5)")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring (nnU-Net's --disable_tta)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (nnUNetv2_predict on CPU takes every core; 1 here by default)")
    parser.add_argument("--pipeline", choices=["sequential", "files"], default="sequential")
    parser.add_argument("--npp", type=int, default=1, help="files pipeline: preprocessing processes")
    parser.add_argument("--nps", type=int, default=1, help="files pipeline: export processes")
    parser.add_argument("--dump", type=Path, default=None, help="sequential pipeline: save inputs and logits")
    args = parser.parse_args(argv)

    args.output.mkdir(parents=True, exist_ok=True)
    set_nnunet_environment(args.output.parent / f".{args.output.name}_nnunet_env", args.threads)
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    imported = time.perf_counter()
    torch.set_num_threads(args.threads)
    predictor = nnUNetPredictor(tile_step_size=args.step, use_gaussian=True,
                                use_mirroring=not args.disable_tta, perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False,
                                allow_tqdm=False)
    fold = args.fold if args.fold == "all" else int(args.fold)
    predictor.initialize_from_trained_model_folder(str(args.model), use_folds=(fold,),
                                                   checkpoint_name=args.checkpoint)
    initialised, startup_cpu = time.perf_counter(), time.process_time()

    if args.dump is not None and args.pipeline != "sequential":
        raise SystemExit("--dump needs --pipeline sequential")
    network_seconds: list[float] = []
    dump_seconds: list[float] = []
    current_case: list[str] = []
    predict_logits = predictor.predict_logits_from_preprocessed_data

    def timed_predict_logits(data):
        start = time.perf_counter()
        logits = predict_logits(data)
        network_seconds.append(time.perf_counter() - start)
        if args.dump is not None:
            start = time.perf_counter()
            args.dump.mkdir(parents=True, exist_ok=True)
            np.save(args.dump / f"{current_case[-1]}_data.npy", np.asarray(data, dtype=np.float32))
            np.save(args.dump / f"{current_case[-1]}_logits.npy", logits.float().numpy())
            dump_seconds.append(time.perf_counter() - start)
        return logits

    predictor.predict_logits_from_preprocessed_data = timed_predict_logits

    images = sorted(args.input.glob("*_0000.nii.gz"))
    if not images:
        raise SystemExit(f"no *_0000.nii.gz images in {args.input}")
    case_ids = [path.name[:-len("_0000.nii.gz")] for path in images]
    cases = []
    start = time.perf_counter()
    if args.pipeline == "sequential":
        for case_id, image in zip(case_ids, images):
            current_case.append(case_id)
            case_start, case_cpu = time.perf_counter(), time.process_time()
            predictor.predict_from_files_sequential([[str(image)]], [str(args.output / case_id)],
                                                    save_probabilities=False, overwrite=True)
            dumped = dump_seconds[-1] if args.dump is not None else 0.0
            cases.append({"case_id": case_id, "total": time.perf_counter() - case_start - dumped,
                          "network": network_seconds[-1], "cpu": time.process_time() - case_cpu - dumped})
            print(f"nnU-Net {case_id}: {cases[-1]['total']:.2f} s (network {cases[-1]['network']:.2f} s)",
                  file=sys.stderr, flush=True)
    else:
        predictor.predict_from_files(str(args.input), str(args.output), save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=args.npp,
                                     num_processes_segmentation_export=args.nps)
        cases = [{"case_id": case_id, "total": None, "network": seconds}
                 for case_id, seconds in zip(case_ids, network_seconds)]
    folder_seconds = time.perf_counter() - start - sum(dump_seconds)

    result = {
        "pipeline": args.pipeline, "step": args.step, "mirroring": not args.disable_tta,
        "mirror_axes": None if args.disable_tta else list(predictor.allowed_mirroring_axes or ()),
        "import_s": imported - PROCESS_START, "initialise_s": initialised - imported,
        "startup_cpu_s": startup_cpu,
        "folder_s": folder_seconds, "cases": cases, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
        "dynamic_network_architectures": version("dynamic-network-architectures"),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
