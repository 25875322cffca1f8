"""What the console shows of a run's log: notices that say nothing new go to the log file only.

Lightning announces the accelerators on every run ("GPU available: False ... TPU available"),
and the step engine says why a CPU run steps eagerly; both are true of every CPU run, so the
console drops them and ``train.log`` keeps them (the job-logging config attaches this filter
to the console handlers only).
"""

from __future__ import annotations

import logging

FILE_ONLY_PREFIXES = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "eager training steps: the device is cpu",
)


class FileOnlyNotices(logging.Filter):
    """Drops the records above from the handler it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(FILE_ONLY_PREFIXES)
