"""A callback for tests: SIGTERM this very process at a chosen optimizer step, as SLURM would."""

import os
import signal

from hydra.experimental.callback import Callback as HydraCallback
from pytorch_lightning.callbacks import Callback


class SigtermAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class JobProbe(HydraCallback):
    """Hydra callback: after each job, append its thread count and RSS to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_job_end(self, config, job_return, **kwargs) -> None:
        import gc
        import json
        import threading

        import psutil

        gc.collect()
        record = {"threads": threading.active_count(), "rss": psutil.Process().memory_info().rss}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class SigtermAt(Callback):
    """SIGTERM this process once, in the named hook: ``setup`` (the data is being loaded),
    ``on_test_batch_end`` (the final test) or ``on_test_end`` (the final figures)."""

    def __init__(self, hook: str) -> None:
        self.sent = False
        setattr(self, hook, self._send)

    def _send(self, *args, **kwargs) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
