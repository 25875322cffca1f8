"""A callback for tests: SIGTERM this very process at a chosen optimizer step, as SLURM would."""

import hashlib
import os
import signal
from pathlib import Path

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
    """SIGTERM this process once, at a phase of the run: ``setup`` (the data is loaded),
    ``on_test_batch_end`` (the final test), ``on_test_end`` (the final figures) or
    ``latent_quality`` (the latent metrics after the test).

    Only where ``$AE_TEST_SIGTERM_LOG`` names a file, into which the checksum of
    ``last.ckpt`` just before the signal goes: the printed command, run without it, completes.
    """

    def __init__(self, hook: str) -> None:
        self.log_path = os.environ.get("AE_TEST_SIGTERM_LOG")
        self.sent, self.root = False, None
        if hook == "latent_quality":
            import ae_lightning.record as record

            original = record.latent_quality

            def terminated_then(*args, **kwargs):
                self._send()
                return original(*args, **kwargs)

            record.latent_quality = terminated_then
        else:
            setattr(self, hook, self._at_hook)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.root = trainer.default_root_dir

    def _at_hook(self, trainer, *args, **kwargs) -> None:
        self.root = trainer.default_root_dir
        self._send()

    def _send(self) -> None:
        if self.sent or not self.log_path:
            return
        self.sent = True
        last = Path(self.root, "checkpoints", "last.ckpt")
        digest = hashlib.sha256(last.read_bytes()).hexdigest() if last.is_file() else ""
        Path(self.log_path).write_text(digest)
        os.kill(os.getpid(), signal.SIGTERM)
