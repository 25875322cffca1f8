"""Train one MLP autoencoder on MNIST: `python train.py model=hidden1024 bottleneck=10`.

The same as the installed `ae-train` command, but reads data/ beside this file by default.
"""

import os
from pathlib import Path

os.environ.setdefault("AE_PROJECT_DIR", str(Path(__file__).resolve().parent))  # data/ beside us

from ae_lightning.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
