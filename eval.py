"""Test a saved checkpoint again, with figures: `python eval.py ckpt_path=<file.ckpt>`.

The same as the installed `ae-eval` command, but reads data/ beside this file by default.
"""

import os
from pathlib import Path

os.environ.setdefault("AE_PROJECT_DIR", str(Path(__file__).resolve().parent))  # data/ beside us

from ae_lightning.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
