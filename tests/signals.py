"""A callback for tests: SIGTERM this very process at a chosen optimizer step, as SLURM would."""

import os
import signal

from pytorch_lightning.callbacks import Callback


class SigtermAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
