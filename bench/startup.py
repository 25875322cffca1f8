"""Wall time of the commands a user types before any training: help, config, completion.

Each command runs ``--repeats`` times as a fresh process from this checkout (the clock around
the process, as the shell's ``time`` would read it), beside ``python -c "import
pytorch_lightning"``, the floor of anything that trains. ``debug=fast`` is the shortest real
run (one batch of train, val and test on ``--data-root``); the issue's target is at most
1.25x the import of Lightning.

    python bench/startup.py --json startup.json
    python bench/startup.py --repeats 5 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PROJECT

COMPLETION_LINE = "python train.py mod"  # what bash hands Hydra when Tab follows "mod"


def commands(
    data_root: str, logs: str, overrides: list[str]
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each row's name, its argv and the environment it adds."""
    python = sys.executable
    return {
        "python train.py --help": ([python, "train.py", "--help"], {}),
        "python train.py --cfg job": ([python, "train.py", "--cfg", "job"], {}),
        "python train.py -sc query=bash (one Tab)": (
            [python, "train.py", "-sc", "query=bash"],
            {"COMP_LINE": COMPLETION_LINE, "COMP_POINT": str(len(COMPLETION_LINE))},
        ),
        "ae-compare --help": ([python, "-m", "ae_lightning.cli.compare", "--help"], {}),
        "ae-export --help": ([python, "-m", "ae_lightning.cli.export", "--help"], {}),
        'python -c "import pytorch_lightning"': ([python, "-c", "import pytorch_lightning"], {}),
        "python train.py debug=fast": (
            [
                python,
                "train.py",
                "debug=fast",
                f"data.root={data_root}",
                "data.download=false",
                *overrides,
            ],
            {"AE_LOGS_DIR": logs},
        ),
    }


def wall_seconds(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=PROJECT, env={**os.environ, **env}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--data-root", default=os.environ.get("AE_DATA_ROOT", str(PROJECT / "data"))
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--override", action="append", default=[], help="another override of the debug=fast run"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as logs:
        rows = {
            name: [round(wall_seconds(command, env), 2) for _ in range(args.repeats)]
            for name, (command, env) in commands(args.data_root, logs, args.override).items()
        }
    lightning = statistics.median(rows['python -c "import pytorch_lightning"'])
    fast = statistics.median(rows["python train.py debug=fast"])
    results = {"seconds": rows, "debug_fast_vs_lightning_import": round(fast / lightning, 2)}
    lines = ["| command | seconds, each run | median |", "|---|---|---|"]
    lines += [f"| `{name}` | {', '.join(f'{t:.2f}' for t in times)} | "
              f"{statistics.median(times):.2f} |" for name, times in rows.items()]  # fmt: skip
    lines += ["", f"debug=fast / import pytorch_lightning (medians): {fast / lightning:.2f}"]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
