"""Run folders and checkpoints from others: no path in them reaches the disk, no write follows
a link out, every reader is bounded. The attacker's files are the tests."""

import hashlib
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import yaml

import ae_lightning
from ae_lightning import runfolder
from ae_lightning.errors import UserError
from ae_lightning.record import write_json
from conftest import PROJECT, run_train_cli, tiny_overrides

# Importing torch alone maps ~3.9 GB of address space; a bomb that got through would need more.
MEMORY_CAP = 5 << 30


def checksums(folder):
    """Every entry under ``folder`` (links as links, never followed) -> its content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = "dir"
    return found


def outside(folder, run):
    """``checksums(folder)`` of everything but the run folder itself."""
    return {p: h for p, h in checksums(folder).items() if not p.startswith(str(run))}


def one_sentence(result):
    """Exit 2, one ``error:`` line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def capped():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_module(module, *args, env=None):
    """``python -m ae_lightning.cli.<module> ARGS`` under the memory cap, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"ae_lightning.cli.{module}", *map(str, args)],
        capture_output=True, text=True, cwd=PROJECT, timeout=300, preexec_fn=capped,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def run_main(module, args, capsys):
    """``ae-<module> ARGS`` in this process (its ``main``): exit code, stdout and stderr.

    An exception escaping ``main`` fails the test, as a traceback would.
    """
    main = importlib.import_module(f"ae_lightning.cli.{module}").main
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def good_run(tiny_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("received_logs")
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "model=linear", "callbacks=minimal", "logger=none"], logs
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (logs / "runs").iterdir()
    return run_dir


@pytest.fixture
def received(good_run, tmp_path):
    """A copy of the trained run, as someone would send it, beside a victim folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me\n")
    copy = tmp_path / "shared" / "run"
    shutil.copytree(good_run, copy)
    return copy, victim


def edit_checkpoints(run, change):
    for name in ("best.ckpt", "last.ckpt"):
        path = run / "checkpoints" / name
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)


# --- 1. no path from a checkpoint reaches the disk ------------------------------------------


def plant_paths(run, victim):
    """Every path-bearing key of ModelCheckpoint's state aimed at a folder to remove."""

    def change(checkpoint):
        (key,) = [k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint")]
        state = checkpoint["callbacks"][key]
        escape = f"{run / 'checkpoints'}/../../../victim"
        state.update(
            dirpath=str(victim), last_model_path="/x/..", best_model_path=escape,
            kth_best_model_path=str(victim), best_k_models={str(victim): torch.tensor(0.0),
                                                            "/x/..": torch.tensor(0.0)},
        )  # fmt: skip

    edit_checkpoints(run, change)


@pytest.mark.parametrize("how", ["resume", "ckpt_path"])
def test_checkpoint_paths_never_reach_the_disk(how, received, tiny_root, tmp_path):
    run, victim = received
    plant_paths(run, victim)
    before_victim, before_run = checksums(victim), checksums(run)
    source = f"resume={run}" if how == "resume" else f"ckpt_path={run}/checkpoints/last.ckpt"
    args = [*tiny_overrides(tiny_root), "model=linear", "callbacks=minimal", "logger=none",
            "trainer.max_epochs=2", source]  # fmt: skip
    result = run_train_cli(args, logs=tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert checksums(victim) == before_victim
    if how == "resume":  # the run went on in its folder: nothing of it was removed
        assert set(before_run) <= set(checksums(run))
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    else:  # the source run is only read
        assert checksums(run) == before_run
        (new_run,) = (tmp_path / "logs" / "runs").iterdir()
        assert (new_run / "checkpoints" / "best.ckpt").is_file()


# --- 2. no write follows a link out ---------------------------------------------------------


LINKED_ENTRIES = ["train.log", ".hydra-resumed", "figures", "metrics.json.tmp",
                  "checkpoints/last.ckpt.tmp"]  # fmt: skip


def plant_link(run, victim, entry):
    target = victim / "precious.txt" if "." in entry.rsplit("/", 1)[-1][1:] else victim
    (run / entry).parent.mkdir(parents=True, exist_ok=True)
    (run / entry).unlink(missing_ok=True)  # the run's own train.log
    (run / entry).symlink_to(target, target_is_directory=target.is_dir())


@pytest.mark.parametrize("given", ["command line", "config file"])
def test_resume_refuses_a_run_folder_with_a_link_out(given, received, tiny_root, tmp_path):
    """Hydra writes train.log before any task code, wherever resume= was set."""
    run, victim = received
    entry = "train.log"
    plant_link(run, victim, entry)
    (tmp_path / "logs").mkdir()  # the logs folder the CLI checks first
    if given == "command line":
        source = [f"resume={run}"]
    else:  # the user's own experiment file, which the command line's check never sees
        (tmp_path / "conf" / "experiment").mkdir(parents=True)
        (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
            f"# @package _global_\nresume: {run}\n"
        )
        source = ["--config-dir", str(tmp_path / "conf"), "experiment=mine"]  # flags first
    before = checksums(tmp_path)
    result = run_train_cli([*source, *tiny_overrides(tiny_root), "model=linear"],
                           logs=tmp_path / "logs")  # fmt: skip
    line = one_sentence(result)
    assert entry in line and f"outside the folder {run}," in line
    assert checksums(tmp_path) == before  # not even Hydra's log or config was written


def as_ordinary_user(args, logs):
    """``python train.py ARGS`` without root's power to list any folder (DAC override)."""
    drop = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: a folder of mode 0300 stays listable")
        caps = "-dac_override,-dac_read_search"
        drop = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return subprocess.run(
        [*drop, sys.executable, str(PROJECT / "train.py"), *args], cwd=PROJECT,
        env={**os.environ, "AE_LOGS_DIR": str(logs)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("where", [".", ".hydra-resumed"])
def test_resume_refuses_a_folder_it_cannot_list(where, received, tiny_root, tmp_path):
    """Mode 0300 (write and search, no read): Hydra writes into it by name, through a link."""
    run, victim = received
    (run / "metrics.json").unlink()
    entry = "train.log" if where == "." else ".hydra-resumed/config.yaml"
    plant_link(run, victim, entry)
    (tmp_path / "logs").mkdir()
    before = checksums(victim)
    (run / where).chmod(0o300)
    try:
        args = [*tiny_overrides(tiny_root), "model=linear", f"resume={run}"]
        line = one_sentence(as_ordinary_user(args, tmp_path / "logs"))
    finally:
        (run / where).chmod(0o755)
    assert f"{run / where} cannot be listed (Permission denied)" in line and "chmod" in line
    assert checksums(victim) == before


def test_resume_refuses_an_interpolation_it_cannot_check(received, tiny_root, tmp_path):
    run, victim = received
    plant_link(run, victim, "train.log")
    (tmp_path / "logs").mkdir()
    before = checksums(tmp_path)
    args = [*tiny_overrides(tiny_root), "model=linear", "resume=${oc.env:AE_TEST_RUN}"]
    result = run_train_cli(args, logs=tmp_path / "logs", env={"AE_TEST_RUN": str(run)})
    line = one_sentence(result)
    assert "resume=${oc.env:AE_TEST_RUN} is an interpolation" in line
    assert checksums(tmp_path) == before  # neither the victim nor the run was written


@pytest.mark.parametrize("entry", LINKED_ENTRIES)
def test_every_written_entry_is_checked_for_links(entry, received):
    run, victim = received
    plant_link(run, victim, entry)
    with pytest.raises(UserError, match="outside the folder"):
        from ae_lightning.atomic import check_no_links_out

        check_no_links_out(run, f"resume={run}")


def test_export_refuses_an_export_link(received, tmp_path, capsys):
    run, victim = received
    (run / "export").symlink_to(victim, target_is_directory=True)
    before = checksums(victim)
    line = one_sentence(run_main("export", [run, "--format", "torchscript"], capsys))
    assert "export" in line and f"outside the folder {run}," in line
    assert checksums(victim) == before


def received_sweep(good_run, tmp_path, links):
    """A sweep folder as someone would send it: one finished job, and ``links`` (name ->
    target) planted in it."""
    sweep = tmp_path / "shared" / "sweep"
    shutil.copytree(good_run, sweep / "job0")
    for name, target in links.items():
        (sweep / name).parent.mkdir(parents=True, exist_ok=True)
        (sweep / name).symlink_to(target, target_is_directory=target.is_dir())
    return sweep


@pytest.mark.parametrize("link", ["comparison/summary.csv", "comparison/summary.md",
                                  "comparison"])  # fmt: skip
def test_compare_refuses_a_received_sweep_with_a_link_out(
    link, received, good_run, tiny_root, tmp_path, capsys
):
    _, victim = received
    target = victim if link == "comparison" else victim / "precious.txt"
    sweep = received_sweep(good_run, tmp_path, {link: target})
    before = checksums(victim)
    line = one_sentence(run_main("compare", [sweep, "--data-root", tiny_root], capsys))
    assert f"{sweep}/comparison" in line and str(victim) in line
    assert checksums(victim) == before


def test_a_sweep_into_a_received_sweep_folder_with_a_link_out_is_refused(
    received, good_run, tiny_root, tmp_path
):
    _, victim = received
    (victim / "notes.md").write_text("mine\n")
    links = {"sweep.json": victim / "precious.txt", "summary.md": victim / "notes.md"}
    sweep = received_sweep(good_run, tmp_path, links)
    before = checksums(victim)
    args = ["-m", *tiny_overrides(tiny_root), "model=linear", "callbacks=minimal",
            "logger=none", "seed=0", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    line = one_sentence(run_train_cli(args, logs=tmp_path / "logs"))
    assert f"hydra.sweep.dir={sweep}" in line and f"outside the folder {sweep}," in line
    assert checksums(victim) == before
    assert sorted(os.listdir(sweep)) == ["job0", "summary.md", "sweep.json"]  # nothing written


@pytest.mark.parametrize("planted", ["metrics.json", "metrics.json.tmp", ".metrics.json.tmp"])
def test_a_planted_link_is_replaced_not_written_through(planted, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / planted).symlink_to(victim)
    write_json(tmp_path / "metrics.json", {"test/mse": 0.1})
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "metrics.json").is_symlink()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test/mse": 0.1}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".metrics.json.") and p != planted]


def test_a_folder_named_like_the_temp_file_cannot_block_the_results(received, tiny_root, tmp_path):
    """A received unfinished run holding a folder ``metrics.json.tmp``: the results still land."""
    run, victim = received
    (run / "metrics.json").unlink()
    (run / "metrics.json.tmp").mkdir()
    (run / "checkpoints" / "last.ckpt.tmp").mkdir()
    before = checksums(victim)
    args = [*tiny_overrides(tiny_root), "model=linear", "callbacks=minimal", "logger=none",
            "trainer.max_epochs=2", f"resume={run}"]  # fmt: skip
    result = run_train_cli(args, logs=tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert checksums(victim) == before


# --- 3. and 6. every reader bounded; each bad file one sentence -----------------------------


def zip_bomb(run):
    """best.ckpt with a tensor member replaced by a deflated run of zeros (a few hundred kB)."""
    path = run / "checkpoints" / "best.ckpt"
    bomb = path.with_name("bomb.ckpt")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w") as out:
        for member in source.infolist():
            if member.filename.endswith("/data/0"):
                info = zipfile.ZipInfo(member.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                with out.open(info, "w", force_zip64=True) as f:
                    chunk = bytes(16 << 20)
                    for _ in range(16):  # 256 MB inflated
                        f.write(chunk)
            else:
                out.writestr(member, source.read(member))
    bomb.replace(path)


def alias_bomb(run):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path = run / ".hydra" / "config.yaml"
    path.write_text(path.read_text() + "\n".join(lines) + "\n")


def deep_config(run):
    path = run / ".hydra" / "config.yaml"
    path.write_text(path.read_text() + "deep: " + "[" * 20_000 + "]" * 20_000 + "\n")


def deep_metrics(run):
    (run / "metrics.json").write_text('{"deep": ' + "[" * 20_000 + "]" * 20_000 + "}")


def deep_utf16(encoding):
    """200,000 levels in UTF-16: U+2200 is the bytes 00 22, a quote to a byte-level scan."""
    return ('{"x": ["\u2200", ' + "[" * 200_000 + "]" * 200_000 + ', "y"]}').encode(encoding)


def deep_metrics_utf16(run):
    (run / "metrics.json").write_bytes(deep_utf16("utf-16"))  # with its BOM: not UTF-8


def test_utf16_without_a_bom_is_not_json_not_a_recursion_error(tmp_path):
    """Without a BOM, UTF-16-LE of ASCII is valid UTF-8 (with NULs): not JSON, so no metrics."""
    path = tmp_path / "metrics.json"
    path.write_bytes(deep_utf16("utf-16-le"))
    assert runfolder.read_json(path) == {}


def test_a_nest_past_the_scan_is_a_refusal_not_a_recursion_error(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "MAX_DEPTH", 10**6)  # as if the scan missed it
    path = tmp_path / "metrics.json"
    path.write_text('{"x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(UserError, match="nested too deep to read"):
        runfolder.read_json(path)


def linked_out(entry):
    """``run/entry`` (a folder) moved beside the run and linked back: read through a link."""

    def make(run):
        away = run.parent / f"away{entry.replace('/', '_')}"
        (run / entry).rename(away)
        (run / entry).symlink_to(away, target_is_directory=True)

    return make


def data_path_elsewhere(run):
    """The saved config names an image folder of the reader's (or ``/``, walked for ever)."""
    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["data"] = {
        "_target_": "ae_lightning.data.ImageFolderDataModule", "path": str(run.parent.parent),
        "image_size": [28, 28], "channels": 1, "test_size": 10, "val_size": 10,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))


def test_a_received_data_path_is_re_derived_from_folders_the_user_named(received, tmp_path):
    run, _ = received
    inside = run / "data" / "bars.npz"
    assert runfolder.data_path(run, "data/bars.npz", None) == str(inside.resolve())
    assert runfolder.data_path(run, "/etc/bars.npz", str(tmp_path)) == str(tmp_path / "bars.npz")
    for saved in ("/etc/passwd", "../victim", "data/../../victim", ""):
        with pytest.raises(UserError, match="pass the folder that holds"):
            runfolder.data_path(run, saved, None)


def test_compare_looks_for_a_received_data_path_only_under_its_data_root(
    received, tiny_root, tmp_path, capsys
):
    """ae-compare --data-root DIR: the run's image folder is DIR/<its name>, never its path."""
    run, _ = received
    data_path_elsewhere(run)
    args = [run, "--out", tmp_path / "cmp", "--data-root", tiny_root]
    line = one_sentence(run_main("compare", args, capsys))
    assert f"{tiny_root / run.parent.parent.name} is not a folder of class subfolders" in line


def yaml_seed(text):
    """Both saved configs with ``seed: <text>``: a YAML date out of range, a huge number."""

    def make(run):
        for name in ("config.yaml", "config_resolved.yaml"):
            path = run / ".hydra" / name
            path.write_text(path.read_text() + f"seed_again: {text}\n")

    return make


def metrics_huge_int(run):
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "test/mse": 10**400}))


def run_info_resumed_number(run):
    (run / "run_info.json").write_text('{"started": "x", "resumed": 5}')


def test_a_date_or_set_in_a_received_config_never_reaches_omegaconf(received):
    run, _ = received
    path = run / ".hydra" / "config_resolved.yaml"
    path.write_text(path.read_text() + "when: 2024-01-01\nwho: !!set {a, b}\nraw: !!binary YQ==\n")
    config = ae_lightning.load_run(run, device="cpu").config
    assert not {"when", "who", "raw"} & set(config) and "data" in config


def metrics_dev_zero(run):
    (run / "metrics.json").unlink()
    (run / "metrics.json").symlink_to("/dev/zero")


def vamp_pseudo_input_bomb(run):
    """A VampPrior checkpoint whose pseudo-inputs alone would be 10^9 images (3 TB)."""

    def change(checkpoint):
        checkpoint["model_family"] = "vamp"
        checkpoint["hyper_parameters"] = {"bottleneck": 2, "pseudo_inputs": 10**9}

    edit_checkpoints(run, change)


def vamp_pseudo_inputs_word(run):
    def change(checkpoint):
        checkpoint["model_family"] = "vamp"
        checkpoint["hyper_parameters"] = {"bottleneck": 2, "pseudo_inputs": "many"}

    edit_checkpoints(run, change)


def metrics_word(run):
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "test/mse": "abc"}))


def hparams(**values):
    return lambda run: edit_checkpoints(run, lambda c: c["hyper_parameters"].update(values))


def key(name, value):
    return lambda run: edit_checkpoints(run, lambda c: c.update({name: value}))


def nan_weights(run):
    def change(checkpoint):
        next(iter(checkpoint["state_dict"].values()))[0] = float("nan")

    edit_checkpoints(run, change)


def wrong_shape(run):
    def change(checkpoint):
        name = next(iter(checkpoint["state_dict"]))
        checkpoint["state_dict"][name] = torch.zeros(3, 3)

    edit_checkpoints(run, change)


def yaml_tag(run):
    path = run / ".hydra" / "config_resolved.yaml"
    path.write_text(path.read_text() + "note: !!python/object/apply:os.getcwd []\n")


def split_seed(run):
    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["data"]["split_seed"] = 10**20
    path.write_text(yaml.safe_dump(config))


def stride0(run):
    """A 2e6 x 2e6 view of one float: 56 kB on disk, 16 TB for any look at its values."""
    edit_checkpoints(
        run, lambda c: c["state_dict"].update(extra=torch.zeros(1).expand(2_000_000, 2_000_000))
    )


def optimizer(change):
    """``change(state)`` on the Adam state (its first parameter's entry and first group)."""

    def make(run):
        def edit(checkpoint):
            state = checkpoint["optimizer_states"][0]
            change(state["state"][0], state["param_groups"][0])

        edit_checkpoints(run, edit)

    return make


def loop_counter(value):
    """The fit loop's optimizer-step count set to ``value`` (Lightning logs by it)."""

    def change(checkpoint):
        loop = checkpoint["loops"]["fit_loop"]
        loop["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"] = value

    return lambda run: edit_checkpoints(run, change)


def complex_score(run):
    def change(checkpoint):
        (name,) = [k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint")]
        checkpoint["callbacks"][name]["best_model_score"] = torch.tensor(1 + 2j)

    edit_checkpoints(run, change)


# Refused where a state is restored into this run's optimizer (resume=, ckpt_path=), so
# load_run (which restores none) is not asked about them.
RESUME_FILES = {
    "exp_avg_short": (
        optimizer(lambda entry, group: entry.update(exp_avg=torch.zeros(3))),
        "state[0].exp_avg=(3,), not a finite torch.float32 tensor of shape",
    ),
    "lr_word": (optimizer(lambda entry, group: group.update(lr="abc")), "lr='abc'"),
    "lr_negative": (optimizer(lambda entry, group: group.update(lr=-1.0)), "lr=-1.0"),
    "params_short": (
        optimizer(lambda entry, group: group.update(params=[0, 1])),
        "params=[0, 1], not the",
    ),
    "step_vector": (
        optimizer(lambda entry, group: entry.update(step=torch.zeros(5, 5))),
        "step=Tensor",
    ),
    "exp_avg_f64": (
        optimizer(lambda entry, group: entry.update(exp_avg=entry["exp_avg"].double())),
        "not a finite torch.float32 tensor",
    ),
    "run_info_resumed_number": (run_info_resumed_number, "run_info.json has resumed=5"),
}


def family(name, **values):
    """The checkpoint relabelled as ``name`` with these settings (what a sender controls)."""

    def change(checkpoint):
        checkpoint["model_family"] = name
        checkpoint["hyper_parameters"] = {"bottleneck": 2, **values}

    return lambda run: edit_checkpoints(run, change)


BAD_FILES = {
    "iwae_samples": (family("iwae", samples=10**9), "samples=1,000,000,000, more than 10,000"),
    "vqvae_codebook": (family("vqvae", codebook_size=50_000_000), "parameters, more than"),
    "vqvae_codebook_wide": (family("vqvae", codebook_size=10**6), "codebook_size=1,000,000"),
    "dropout_out_of_range": (hparams(dropout=5.0), "best.ckpt: model.dropout=5.0 is not in"),
    "stride0_weight": (stride0, "state_dict.extra=Tensor, not a plain tensor"),
    "stride0_moment": (
        optimizer(lambda e, g: e.update(exp_avg=torch.zeros(1).double().expand(50_000, 50_000))),
        "exp_avg=Tensor, not a plain tensor",
    ),
    "complex_score": (complex_score, "best_model_score=Tensor, not a plain tensor"),
    "counter_huge": (loop_counter(2**70), "not a whole number from 0 to 2**63-1"),
    "counter_negative": (loop_counter(-5), "completed=-5, not a whole number"),
    "zip_bomb": (zip_bomb, "compressed"),
    "alias_bomb": (alias_bomb, "alias"),
    "deep_config": (deep_config, "deeper than 100"),
    "deep_metrics": (deep_metrics, "levels deep"),
    "deep_metrics_utf16": (deep_metrics_utf16, "metrics.json is not UTF-8 text"),
    "metrics_dev_zero": (metrics_dev_zero, "outside the run folder"),
    "yaml_date_out_of_range": (yaml_seed("2024-13-45"), "YAML (ValueError)"),
    "yaml_5000_digits": (yaml_seed("9" * 5000), "YAML (ValueError)"),
    "metrics_huge_int": (metrics_huge_int, "has test/mse=1000000"),
    "data_path_elsewhere": (data_path_elsewhere, "a received run does not choose what"),
    "hydra_folder_linked_out": (linked_out(".hydra"), "outside the run folder"),
    "checkpoints_folder_linked_out": (linked_out("checkpoints"), "outside the run folder"),
    "metrics_word": (metrics_word, "test/mse='abc'"),
    "wide_hidden": (hparams(hidden=[300_000]), "parameters, more than the limit"),
    "many_layers": (hparams(hidden=[1] * 10**6), "hidden layers"),
    "epoch_word": (key("epoch", "abc"), "epoch='abc'"),
    "hparams_number": (key("hyper_parameters", 5), "hyper_parameters=5"),
    "loops_list": (key("loops", [1]), "loops=list"),
    "optimizer_states_dict": (key("optimizer_states", {"a": 1}), "optimizer_states=dict"),
    "callbacks_list": (key("callbacks", [1]), "callbacks=list"),
    "state_dict_numbers": (key("state_dict", {"w": 5}), "state_dict=dict"),
    "nan_weights": (nan_weights, "non-finite weights"),
    "wrong_shape": (wrong_shape, "not an ae-lightning checkpoint (RuntimeError)"),
    "yaml_tag": (yaml_tag, "config_resolved.yaml cannot be read"),
    "split_seed": (split_seed, "data.split_seed=100000000000000000000"),
    "vamp_pseudo_input_bomb": (vamp_pseudo_input_bomb, "parameters, more than the limit"),
    "vamp_pseudo_inputs_word": (vamp_pseudo_inputs_word, "of the wrong type for a vamp"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_load_run_refuses_each_bad_file_in_one_sentence(case, received, tmp_path):
    run, _ = received
    make, fragment = BAD_FILES[case]
    make(run)
    outside = checksums(tmp_path / "victim")
    start = time.perf_counter()
    with pytest.raises(UserError) as refused:
        ae_lightning.load_run(run, device="cpu").test_images()
    assert time.perf_counter() - start < 5  # refused before it allocated or looped
    message = str(refused.value)
    assert fragment in message and "\n" not in message
    assert checksums(tmp_path / "victim") == outside


ENTRY_POINTS = {  # the bad file and where a user meets it
    "resume_epoch_word": ("epoch_word", "resume"),
    "ckpt_path_wide_hidden": ("wide_hidden", "ckpt_path"),
    "resume_wrong_shape": ("wrong_shape", "resume", "of shape (3, 3) but this config's model"),
    "eval_nan_weights": ("nan_weights", "eval"),
    "compare_alias_bomb": ("alias_bomb", "compare"),
    "compare_deep_metrics": ("deep_metrics", "compare"),
    "compare_deep_metrics_utf16": ("deep_metrics_utf16", "compare"),
    "compare_hydra_folder_linked_out": ("hydra_folder_linked_out", "compare"),
    "compare_metrics_huge_int": ("metrics_huge_int", "compare"),
    "compare_yaml_date_out_of_range": ("yaml_date_out_of_range", "compare"),
    "resume_run_info_resumed_number": ("run_info_resumed_number", "resume"),
    "resume_checkpoints_folder_linked_out": (
        "checkpoints_folder_linked_out",
        "resume",
        "so a write there would overwrite its target",
    ),
    "compare_checkpoints_folder_linked_out": ("checkpoints_folder_linked_out", "compare"),
    "export_checkpoints_folder_linked_out": ("checkpoints_folder_linked_out", "export"),
    "export_zip_bomb": ("zip_bomb", "export"),
    "export_yaml_tag": ("yaml_tag", "export"),
    "resume_stride0_moment": ("stride0_moment", "resume"),
    "resume_counter_huge": ("counter_huge", "resume"),
    "resume_exp_avg_short": ("exp_avg_short", "resume"),
    "ckpt_path_exp_avg_short": ("exp_avg_short", "ckpt_path"),  # was SIGSEGV in fused Adam
    "resume_lr_word": ("lr_word", "resume"),
    "ckpt_path_params_short": ("params_short", "ckpt_path"),
    "resume_step_vector": ("step_vector", "resume"),
    "resume_exp_avg_f64": ("exp_avg_f64", "resume"),
    "resume_lr_negative": ("lr_negative", "resume"),
}


# Cases whose file is refused by the same reader as a case kept in the default run (and by
# load_run above, in-process): each is a whole train.py or ae-compare process, so they run
# with -m slow.
SLOW_ENTRY_POINTS = {
    "compare_deep_metrics_utf16", "compare_metrics_huge_int", "compare_yaml_date_out_of_range",
    "resume_lr_word", "resume_lr_negative", "resume_step_vector", "resume_exp_avg_f64",
    "ckpt_path_params_short", "compare_hydra_folder_linked_out",
    "export_checkpoints_folder_linked_out", "resume_run_info_resumed_number",
    "resume_counter_huge",
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_ENTRY_POINTS else c
     for c in sorted(ENTRY_POINTS)],
)  # fmt: skip
def test_each_entry_point_refuses_a_bad_file_in_one_sentence(
    case, received, tiny_root, tmp_path, capsys
):
    run, victim = received
    bad, where, *said = ENTRY_POINTS[case]
    make, fragment = (BAD_FILES | RESUME_FILES)[bad]
    fragment = said[0] if said else fragment  # the entry point's own words
    make(run)
    before = outside(tmp_path, run)
    common = [*tiny_overrides(tiny_root), "model=linear", "callbacks=minimal", "logger=none"]
    logs = tmp_path / "logs"
    if where == "resume":  # to train further: a finished run's resume= changes nothing
        result = run_train_cli([*common, "trainer.max_epochs=2", f"resume={run}"], logs)
    elif where == "ckpt_path":
        result = run_train_cli([*common, f"ckpt_path={run}/checkpoints/last.ckpt"], logs)
    elif where == "eval":
        ckpt = f"ckpt_path={run}/checkpoints/best.ckpt"
        result = run_train_cli([*common, ckpt], logs, script="eval.py")
    elif where == "compare":
        result = run_main("compare", [run, "--out", tmp_path / "cmp", "--data-root", tiny_root],
                          capsys)  # fmt: skip
    elif bad == "zip_bomb":  # its own process, under the memory cap
        result = run_module("export", run, "--format", "torchscript")
    else:
        result = run_main("export", [run, "--format", "torchscript"], capsys)
    assert fragment in one_sentence(result)
    after = outside(tmp_path, run)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing changed
    new = [p for p in after if p not in before]
    assert not [p for p in new if not p.startswith(str(logs))], new  # only a refused run's log


def test_a_checkpoint_of_another_optimizer_is_refused_before_training(
    received, tiny_root, tmp_path
):
    """An Adam run's last.ckpt given to an SGD run: SGD's first step looks its momentum up
    in Adam's groups, a KeyError traceback, unless the state is refused first."""
    run, _ = received
    args = [*tiny_overrides(tiny_root), "model=linear", "callbacks=minimal", "logger=none",
            "optimizer=sgd", f"ckpt_path={run}/checkpoints/last.ckpt"]  # fmt: skip
    message = one_sentence(run_train_cli(args, tmp_path / "logs"))
    assert "holds the state of another optimizer than SGD" in message
    assert "param_groups[0] has amsgrad, betas" in message


def test_compare_shows_a_diverged_run_as_a_failed_row(
    received, good_run, tiny_root, tmp_path, capsys
):
    run, _ = received
    nan_weights(run)
    args = [good_run, run, "--out", tmp_path / "cmp", "--data-root", tiny_root]
    result = run_main("compare", args, capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "non-finite weights" in (tmp_path / "cmp" / "summary.md").read_text()


def test_compare_checks_the_first_runs_model_against_its_data(received, tmp_path, capsys):
    """A lone run whose config names 8x8 images while its checkpoint is a 28x28 model."""
    run, _ = received
    import numpy as np

    images = np.random.default_rng(0).integers(0, 255, (200, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", images=images, labels=np.arange(200) % 10)
    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    npz = {"path": str(tmp_path / "small.npz"), "test_size": 50, "val_size": 20}
    config["data"] = {"_target_": "ae_lightning.data.NpzDataModule", **npz}
    path.write_text(yaml.safe_dump(config))
    args = [run, "--out", tmp_path / "cmp", "--data-root", tmp_path]  # where small.npz is
    line = one_sentence(run_main("compare", args, capsys))
    assert f"{run} was trained on images of shape (1, 28, 28)" in line
    assert "has images of shape (1, 8, 8)" in line


# --- 4. received configs are never resolved -------------------------------------------------


def test_a_received_data_root_is_never_read(received, tiny_root, tmp_path, monkeypatch):
    """A run's saved data.root names the sender's folder: this machine reads its own
    (data_root=, else $AE_DATA_ROOT), even where the sender's path exists here too."""
    run, _ = received
    decoy = tmp_path / "senders_data"
    shutil.copytree(tiny_root, decoy)
    images_file = decoy / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    header = images_file.read_bytes()[:16]
    images_file.write_bytes(header + bytes(images_file.stat().st_size - 16))  # all black
    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["data"]["root"] = str(decoy)
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("AE_DATA_ROOT", str(tiny_root))
    images, _ = ae_lightning.load_run(run, device="cpu").test_images()
    assert images.max() > 0  # ours, not the all-black decoy
    given, _ = ae_lightning.load_run(run, device="cpu", data_root=decoy).test_images()
    assert given.max() == 0  # the folder the caller names is read


def test_an_environment_reference_in_a_received_config_is_never_resolved(
    received, tmp_path, monkeypatch
):
    run, _ = received
    monkeypatch.setenv("AE_TEST_SECRET", "s3cr3t-value")
    for name in ("config.yaml", "config_resolved.yaml"):
        path = run / ".hydra" / name
        config = yaml.safe_load(path.read_text())
        config["data"]["root"] = "${oc.env:AE_TEST_SECRET}"
        config["stolen"] = "${oc.env:AE_TEST_SECRET}"
        path.write_text(yaml.safe_dump(config))
    assert "root" not in runfolder.data_settings(run)  # absent: the default is used
    loaded = ae_lightning.load_run(run, device="cpu")
    from omegaconf import OmegaConf

    shown = OmegaConf.to_yaml(loaded.config, resolve=True)
    assert "s3cr3t" not in shown and "stolen" not in loaded.config
