"""``--help`` of ``ae-train`` (Hydra's help page, without Hydra's cost) and ``ae-eval`` (its
own page, ``EVAL_PAGE``: a checkpoint brings its model, so most groups do not apply).

Hydra fills the page's ``$APP_CONFIG_GROUPS`` by asking its config repository for each
group's options, and deep-copies the whole repository (its plugins' configs included) on
every query; it also lists Hydra's own groups, which the page never shows. The options are
the YAML files of the package's ``conf/`` folders, so listing those folders gives the same
page. The page is still Hydra's help template (``conf/hydra/help/ae_lightning.yaml``), read
here as data: ``--hydra-help`` and Hydra's config see the same file.
"""

from __future__ import annotations

import os
import string
import sys
from importlib.resources import files
from importlib.resources.abc import Traversable

import yaml

HELP_FLAGS = ("--help", "-h")
TEMPLATE = ("hydra", "help", "ae_lightning.yaml")
NOT_APP_GROUPS = ("hydra",)  # Hydra's own groups: the page lists the app's only


def wants_help(argv: list[str]) -> bool:
    """Whether a command line asks for the help page, as Hydra's parser reads ``-h``."""
    return any(arg in HELP_FLAGS for arg in argv[1:])


def config_groups() -> dict[str, list[str]]:
    """Each config group of ``conf/`` (``model``, ``hydra``'s excluded) and its options."""
    groups: dict[str, list[str]] = {}

    def visit(folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            group = f"{prefix}{entry.name}"
            if not entry.is_dir() or entry.name.startswith(("_", ".")) or group in NOT_APP_GROUPS:
                continue
            options = [e.name.removesuffix(".yaml") for e in entry.iterdir()
                       if e.is_file() and e.name.endswith(".yaml")]  # fmt: skip
            if options:
                groups[group] = sorted(options)
            visit(entry, f"{group}/")

    visit(files("ae_lightning.conf"), "")
    return dict(sorted(groups.items()))


# ae-eval takes its model from the checkpoint: its page names the one argument it needs and
# the groups that still apply, not the training page's model, optimizer and search groups.
EVAL_GROUPS = ("data", "trainer", "callbacks", "logger", "debug")
EVAL_PAGE = """eval: test a trained checkpoint again (test metrics, final figures), in a new run
folder.

Usage: ae-eval ckpt_path=<run>/checkpoints/best.ckpt [group=option ...] [key=value ...]
       (python eval.py in a checkout takes the same arguments)

The model (its family, sizes and weights) comes from the checkpoint, so the model,
optimizer, scheduler, experiment and search groups do not apply. These do:
  data            the dataset to test on (mnist unless named: name the run's own)
  trainer         device and precision
  callbacks       which figures are drawn
  logger          where the test metrics and figures go
  debug           quick checks (debug=fast: one test batch)
  eval.*          test/nll, sample quality, latent metrics (see --cfg job)

Their options:
$APP_CONFIG_GROUPS
"""


def help_page(app_name: str) -> str:
    """The page ``python <app_name>.py --help`` prints, as Hydra would render it."""
    if app_name == "eval":
        groups = {g: o for g, o in config_groups().items() if g.split("/")[0] in EVAL_GROUPS}
        options = "".join(f"{group}: {', '.join(names)}\n" for group, names in groups.items())
        return string.Template(EVAL_PAGE).substitute(APP_CONFIG_GROUPS=options)
    template_file = files("ae_lightning.conf").joinpath(*TEMPLATE)
    template = yaml.safe_load(template_file.read_text(encoding="utf-8"))["template"]
    options = "".join(f"{group}: {', '.join(names)}\n" for group, names in config_groups().items())
    page = template.replace("${hydra.help.app_name}", app_name)
    return string.Template(page).substitute(APP_CONFIG_GROUPS=options)


def print_help(app_name: str) -> None:
    """Print the page; a reader that stops early (``--help | head``) is no error."""
    try:
        print(help_page(app_name), flush=True)
    except BrokenPipeError:  # Python's documented recipe: no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
