"""Steps per second of a training run, for the CPU DDP scaling benchmark (docs/benchmarks.md).

A Lightning callback added on the command line; rank 0 prints optimizer steps per second over the
steps after ``warmup`` (the first steps build the data pipeline and the gloo process group):

    PYTHONPATH=bench OMP_NUM_THREADS=1 .venv/bin/python train.py experiment=cpu_demo trainer=ddp \\
        trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true data.synthetic.size=tiny \\
        data.num_workers=0 data.batch_size=4 data.iterations_per_epoch=25 trainer.max_epochs=1 \\
        trainer.num_sanity_val_steps=0 trainer.check_val_every_n_epoch=100 logger=csv \\
        callbacks.model_checkpoint=null +callbacks.timer._target_=ddp_step_timer.StepTimer
"""

from __future__ import annotations

import time

import lightning as L


class StepTimer(L.Callback):
    """Prints ``steps/s`` of the optimizer steps after the first ``warmup`` ones (rank 0 only)."""

    def __init__(self, warmup: int = 5):
        self.warmup = warmup
        self.start: float | None = None
        self.start_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if self.start is not None and trainer.is_global_zero:
            steps = trainer.global_step - self.start_step
            print(f"StepTimer: {steps / (time.perf_counter() - self.start):.2f} steps/s over {steps} steps "
                  f"({trainer.world_size} process(es))")
