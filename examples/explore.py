"""Open a finished run as a notebook would: `python examples/explore.py logs/runs/<run>`
(no argument: the newest run under $AE_LOGS_DIR, else ./logs).

Encodes test digits, checks the reconstruction error against metrics.json, walks the
latent line between two digits and decodes random codes; saves the pictures to explore.png.
"""

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ae_lightning  # noqa: E402

runs = Path(os.environ.get("AE_LOGS_DIR", "logs")) / "runs"  # where train.py writes them
path = sys.argv[1] if len(sys.argv) > 1 else max(runs.iterdir()).as_posix()
run = ae_lightning.load_run(path)  # best checkpoint; checkpoint="last" for the last one
saved_mse = run.metrics["test/mse"]  # metrics.json, as written at the end of training
print(f"run {run.path.name}: {run.bottleneck}-D codes, saved test/mse {saved_mse:.5f}")

images, labels = run.test_images()  # uint8 (N, 28, 28) and digit labels, on the CPU
codes = run.encode(images)  # (N, z) on the model's device; numpy arrays work too
recon = run.reconstruct(images)  # (N, 1, 28, 28), pixels in (0, 1)
mse = (recon.cpu() - images.unsqueeze(1) / 255).square().mean()
print(f"codes {tuple(codes.shape)}, reconstruction MSE {mse:.5f}")

first, second = 0, int((labels != labels[0]).nonzero()[0])  # two different digits
line = run.interpolate(images[first], images[second], steps=8)  # (8, 1, 28, 28)
samples = run.sample(8, sampler="gaussian")  # decoded codes from a Gaussian fit

fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for row, batch in zip(axes, (line, samples), strict=True):
    for ax, image in zip(row, batch.cpu(), strict=True):
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
axes[0, 0].set_title(f"latent line {int(labels[first])} -> {int(labels[second])}", loc="left")
axes[1, 0].set_title("samples", loc="left")
fig.savefig("explore.png", dpi=100, bbox_inches="tight")
print(f"interpolation {tuple(line.shape)}, samples {tuple(samples.shape)} -> explore.png")
