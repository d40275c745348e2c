"""Run the notebooks headless into a folder of their own (``make notebooks``): papermill, through the
output-folder guard, so an executed notebook never lands in notebooks/ or over a file it did not write.

    python scripts/run_notebooks.py --out outputs/notebooks [--data ROOT] [--runs A B] [--compare A B] [--eval DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pancreas_mtl.output_guard import OutputFolder, OutputFolderError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("01_data.ipynb", "02_training.ipynb", "03_errors.ipynb")


def parameters(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """{notebook: its parameters} of the notebooks the given inputs run."""
    chosen = {}
    if args.data:
        chosen["01_data.ipynb"] = {"data_root": args.data}
    if args.runs:
        chosen["02_training.ipynb"] = {"runs": args.runs, "compare_runs": args.compare or [],
                                       "compare_out": str(out / "compare")}
    if args.eval:
        chosen["03_errors.ipynb"] = {"evaluation_dir": args.eval}
    return chosen


def run(args: argparse.Namespace) -> list[Path]:
    """Execute the chosen notebooks into ``args.out``; the executed notebooks' paths.

    Raises:
        OutputFolderError: ``out`` is (or is inside) notebooks/, or the guard refuses it.
    """
    out = Path(args.out).expanduser()
    source = NOTEBOOK_DIR.resolve()
    if source == out.resolve() or source in out.resolve().parents:
        raise OutputFolderError(f"NB_OUT={args.out} is inside {NOTEBOOK_DIR}, which holds the committed notebooks; "
                                "executed notebooks go to a folder of their own (default outputs/notebooks)")
    chosen = parameters(args, out)
    if not chosen:
        raise OutputFolderError("give DATA=<dataset root>, RUNS=<run or multirun folders> and/or EVAL=<evaluation folder>")
    folder = OutputFolder.open(out, "notebooks", reads=[NOTEBOOK_DIR, args.data, args.eval, *(args.runs or []),
                                                        *(args.compare or [])], writes=list(chosen))
    import papermill

    written = []
    for name, values in chosen.items():
        if not folder.may_write(name):
            continue
        print(f"notebook {name} -> {out / name}", flush=True)
        papermill.execute_notebook(str(NOTEBOOK_DIR / name), str(out / name), parameters=values,
                                   kernel_name="python3", progress_bar=False)
        written.append(name)
        folder.record(f".{Path(name).stem}", [name])
    return [out / name for name in written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the executed notebooks (never notebooks/)")
    parser.add_argument("--data", help="dataset root for 01_data")
    parser.add_argument("--runs", nargs="*", help="run or multirun folders for 02_training")
    parser.add_argument("--compare", nargs="*", help="sweeps scored by crossval or holdout, ranked in 02_training")
    parser.add_argument("--eval", help="evaluation folder for 03_errors")
    try:
        run(parser.parse_args(argv))
    except OutputFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
