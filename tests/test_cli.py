"""The single entry point: help on every command, one-line errors with exit status 2. What needs
no process of its own runs in this one (helpers.cli); a `unit` test that launched anything would
fail (conftest.py), which is how "nothing was launched" is checked there."""
import subprocess

import pytest

from helpers import ENV, ROOT, cli, run_cli, train_command
from hvd_ba.__main__ import COMMANDS


@pytest.mark.integration
def test_top_level_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.unit
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"hvd_ba {command}" in r.stdout


@pytest.mark.unit
def test_unknown_command_is_one_line_exit_2():
    r = cli("trian")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["hvd_ba: unknown command 'trian' (choose from: train, demo, make-data, plan, hosts, settings, stage, pack, analyze, plot, status, sweep, doctor, bench)"]


@pytest.mark.integration
def test_missing_data_directory_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope"
    r = run_cli("train", "--config", "demo", "--set", f"data.path={missing}", f"run.out_dir={tmp_path / 'run'}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(missing / "train") in lines[0] and "data.path" in lines[0]


@pytest.mark.unit
def test_bad_config_value_stops_demo_before_launch(tmp_path, small_data):
    r = cli("demo", "--data", str(small_data), "--out", str(tmp_path / "run"), "--set", "data.copies=-1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["hvd_ba demo: error: config key 'data.copies': must be >= 1, got -1"]
    assert "horovodrun" not in r.stdout  # nothing was launched


@pytest.mark.integration
@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("settings, line", [
    (["model.arch=resnet5"], "config key 'model.arch': must be one of ('resnet50', 'mobilenet', 'alexnet', "
                             "'small_resnet'), got 'resnet5'"),
    (["model.width=0.3", "model.arch=resnet50"], "config key 'model.width': resnet50 has no width multiplier here "
                                                 "(use 1.0), got 0.3"),
])
def test_a_model_the_nets_cannot_build_is_refused_before_any_rank_starts(tmp_path, small_data, command, settings,
                                                                         line):
    """An architecture typo, or a width its network does not take, used to pass the config and end
    the run after start-up with a traceback: now one line naming the key, nothing launched."""
    out = tmp_path / "run"
    if command == "train":
        r = run_cli("train", "--config", "demo", "--set", f"data.path={small_data}", f"run.out_dir={out}", *settings)
    else:
        r = run_cli("demo", "--data", str(small_data), "--out", str(out), "--set", *settings)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"hvd_ba {command}: error: {line}"]
    assert "horovodrun" not in r.stdout and not out.exists()  # nothing launched, no run folder


@pytest.mark.integration
def test_make_data_writes_imagenet_layout(tmp_path):
    r = run_cli("make-data", str(tmp_path / "d"), "--classes", "3", "--train-per-class", "4", "--val-per-class", "2")
    assert r.returncode == 0, r.stderr
    train = sorted(p.relative_to(tmp_path / "d") for p in (tmp_path / "d" / "train").rglob("*.JPEG"))
    val = list((tmp_path / "d" / "val").rglob("*.JPEG"))
    assert len(train) == 12 and len(val) == 6
    assert str(train[0]) == "train/n90000000/n90000000_00000.JPEG"


@pytest.mark.unit
def test_plan_prints_the_paper_figures_for_32_ranks():
    r = cli("plan", "--config", "resnet50", "--ranks", "32")
    assert r.returncode == 0, r.stderr
    for line in ("unique batch: 64 per rank, 2048 global; copies M = 4",
                 "samples per step: 256 per rank, 8192 global",
                 "ghost BN: 4 groups of 64 per rank (split)",
                 "peak LR: 0.8 = 0.1 x 2048 / 256 (M does not change it), warmup from 0.1 to 0.8 over 5 epochs "
                 "(linear per iteration), then x0.1 at epochs 30, 60, 80 of 90",
                 "steps per epoch: 625 (those of unique batch 2048)"):
        assert line in r.stdout, line


def takes_set(command) -> bool:
    return any("--set" in action.option_strings for action in COMMANDS[command][0]()._actions)


@pytest.mark.unit
@pytest.mark.parametrize("command", [c for c in sorted(COMMANDS) if takes_set(c)])
def test_repeated_set_flags_accumulate_and_the_later_value_wins(command):
    """`--set a --set b` keeps both (a second flag used to replace the first without a word), on
    every command that takes --set; and of one key given twice the later value wins, over the
    preset's."""
    sets = ["--set", "data.copies=2", "--set", "data.unique_batch=8", "model.ghost_size=8", "--set", "data.copies=3"]
    required = {"plan": ["--ranks", "2"], "analyze": ["lambda-max"]}.get(command, [])
    args, _ = COMMANDS[command][0]().parse_known_args([*required, *sets])
    assert args.set == ["data.copies=2", "data.unique_batch=8", "model.ghost_size=8", "data.copies=3"]
    r = cli("plan", "--config", "demo", "--ranks", "2", *sets)
    assert r.returncode == 0, r.stderr
    assert "unique batch: 8 per rank, 16 global; copies M = 3" in r.stdout
    assert "ghost BN: 3 groups of 8 per rank (split)" in r.stdout


@pytest.mark.integration
def test_plan_imports_no_torch(small_data):
    """slurm/job.sh runs `plan --show-config` before every attempt: in about 0.2 s without torch
    (importing torch and torchvision costs 5-7 CPU-s on a 2-core machine)."""
    import subprocess
    import sys

    from helpers import ENV, ROOT

    code = ("import sys; from hvd_ba.__main__ import main; "
            f"code = main(['plan', '--show-config', '--ranks', '2', '--config', 'demo', '--set', 'data.path={small_data}']); "
            "assert code == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 0 and "resolved config:" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "192 training images" in r.stdout  # it listed data.path's train/ split


@pytest.mark.integration
def test_a_config_refusal_under_horovodrun_is_said_once_by_rank_0(tmp_path, small_data):
    """Every rank loads the same settings and meets the same refusal; rank 0 alone says it (the
    other ranks exit 2 without a word), so a 64-rank job shows one line, not 64."""
    out = tmp_path / "run"
    r = subprocess.run(train_command("gloo", small_data, out, settings=["model.arch=resnet5"]), capture_output=True,
                       text=True, timeout=300, env=ENV, cwd=ROOT)
    said = [line for line in (r.stdout + r.stderr).splitlines() if "error: config key 'model.arch'" in line]
    assert r.returncode != 0 and len(said) == 1 and said[0].startswith("[0]"), r.stdout[-2000:] + r.stderr[-2000:]
    assert not out.exists()  # no rank started a run
