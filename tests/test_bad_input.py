"""Bad input: 100 odd files mixed into a real dataset (supported ones, PNG, CMYK and greyscale
JPEGs, a PNG named .JPEG, decode to the right pixels; broken ones, truncated, empty, text, are
counted and replaced; nothing crashes); damaged checkpoint files; a table of bad flags and files
over every command (one line, a non-zero status, no traceback); early exits that print only
their line."""
import io
import json
import shutil

import pytest

import numpy as np
import torch
from PIL import Image

from hvd_ba.config import load_config
from hvd_ba.data.manifest import load_index
from hvd_ba.data.pipeline import make_train_loader

COLOUR = (200, 40, 90)  # a solid colour: every crop of a supported file must show it


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def write_odd_files(folder, rng) -> dict:
    """100 files in one class folder; returns {file name: expected RGB or None for broken}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg(Image.new("RGB", (300, 240), COLOUR))
    cases = {}
    for i in range(20):  # truncated at 20-80 % of the bytes
        cut = int(len(good) * rng.uniform(0.2, 0.8))
        cases[f"truncated_{i}.JPEG"] = (good[:cut], None)
    for i in range(15):
        cases[f"empty_{i}.JPEG"] = (b"", None)
    for i in range(15):
        cases[f"text_{i}.JPEG"] = (f"not an image {i}\n".encode() * 20, None)
    png = io.BytesIO()
    Image.new("RGB", (260, 200), COLOUR).save(png, "PNG")
    for i in range(10):
        cases[f"photo_{i}.png"] = (png.getvalue(), COLOUR)
    for i in range(5):
        cases[f"png_named_{i}.JPEG"] = (png.getvalue(), COLOUR)
    cmyk = Image.new("RGB", (280, 220), COLOUR).convert("CMYK")
    for i in range(15):
        cases[f"cmyk_{i}.JPEG"] = (jpeg(cmyk), COLOUR)
    grey = Image.new("L", (320, 240), 128)
    for i in range(20):
        cases[f"grey_{i}.JPEG"] = (jpeg(grey), (128, 128, 128))
    assert len(cases) == 100
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: expected for name, (_, expected) in cases.items()}


@pytest.mark.unit
def test_hundred_odd_files_in_a_real_dataset(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    expected = write_odd_files(data / "train" / "n90000002", np.random.default_rng(0))
    index = load_index(data, "train", None)
    assert len(index) == 4 * 48 + 100
    cfg = load_config("demo", [f"data.path={data}", "data.manifest_dir=null", "data.workers=2", "data.copies=2",
                               "data.unique_batch=73", "model.ghost_size=null", "augment.size=64"])
    loader = make_train_loader(index, cfg, rank=0, world=1)
    loader.batch_sampler.set_epoch(0)
    bad, seen, files, samples = [], {}, 0, 0
    for batch in loader:  # 292 files in 4 steps of 73: the whole epoch
        bad += [entry.split(" (")[0].rsplit("/", 1)[1] for entry in batch["bad"]]
        files += batch["files"]
        samples += batch["images"].shape[0]
        images = batch["images"].view(2, 73, 64, 64, 3)
        for b, i in enumerate(batch["indices"].tolist()):
            seen[index.paths[i].rsplit("/", 1)[1]] = images[:, b]
    broken = {n for n, e in expected.items() if e is None}
    assert sorted(set(bad)) == sorted(broken) and len(broken) == 50
    # a broken file is tried again when it comes up as another's replacement: every try is a read
    assert samples == 2 * 292 and files == 292 + len(bad)
    supported = {n: e for n, e in expected.items() if e is not None}
    decoded = {n: seen[n] for n in supported if n in seen}
    assert len(decoded) >= 45  # almost all supported files appear as themselves (a few stand in twice)
    for name, copies in decoded.items():
        mean = copies.float().mean(dim=(0, 1, 2))
        assert torch.allclose(mean, torch.tensor(supported[name], dtype=torch.float), atol=4), (name, mean)
    assert not broken & set(seen)  # no broken file reached a batch


# ------------------------------------------------------------------ every command's bad input
def damaged_files(folder) -> dict:
    """Files a user may hand us as a checkpoint: truncated, text, empty, a pickle that runs code
    when unpickled without weights_only, a torch file of another kind, a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    torch.save({"format": 2, "model": {"w": torch.zeros(64, 64)}}, good)
    files = {"truncated": good.getvalue()[: len(good.getvalue()) // 2], "text": b"not a checkpoint\n" * 10,
             "empty": b""}
    for name, data in files.items():
        (folder / f"{name}.pt").write_bytes(data)

    # os.system("touch code-ran") when unpickled, as pickle.dumps of such an object writes it
    (folder / "code.pt").write_bytes(b"cos\nsystem\n(S'touch " + str(folder / "code-ran").encode() + b"'\ntR.")
    torch.save([1, 2, 3], folder / "list.pt")
    (folder / "a-folder.pt").mkdir(exist_ok=True)
    return {"truncated": "truncated, damaged or not a torch file", "text": "truncated, damaged or not a torch file",
            "empty": "truncated, damaged or not a torch file",
            "code": "holds Python objects other than tensors and plain types (refused unloaded, nothing in it was run)",
            "list": "not an hvd_ba checkpoint of format 1 or 2", "a-folder": "a folder, not a checkpoint file",
            "missing": "no such file"}


@pytest.mark.unit
def test_a_damaged_checkpoint_is_one_line_naming_why_and_runs_no_code(tmp_path):
    from hvd_ba.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint

    for name, reason in damaged_files(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / f"{name}.pt")
        assert reason in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
    assert not (tmp_path / "code-ran").exists()
    # run.resume=auto skips a damaged newest checkpoint (with a warning) rather than failing
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "ckpt-000000002.pt").write_bytes((tmp_path / "truncated.pt").read_bytes())
    assert find_checkpoint("auto", tmp_path / "run") is None


@pytest.mark.unit
def test_a_damaged_manifest_is_listed_again(small_data, tmp_path, caplog):
    """The manifest is a cache: a header that is not an object, one without classes, a row that is
    not <file> <label> <size>: each is a warning naming the file, and the folder is listed again."""
    import gzip
    import json

    from hvd_ba.data.manifest import load_index, manifest_path

    good = load_index(small_data, "train", None)
    path = manifest_path(small_data / "train", tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"version": 1, "root": str((small_data / "train").resolve()), "files": 1, "classes": list(good.classes)}
    for text in ("[1]\n", json.dumps({"version": 1}) + "\n", json.dumps(header) + "\na.JPEG\tx\t7\n",
                 json.dumps(header) + "\na.JPEG\t1\n"):
        with gzip.open(path, "wt") as f:
            f.write(text)
        caplog.clear()
        index = load_index(small_data, "train", tmp_path, write=False)
        assert index.paths == good.paths and list(index.labels) == list(good.labels), text
        assert f"manifest '{path}'" in caplog.text and "listing the folder again" in caplog.text, (text, caplog.text)


@pytest.mark.unit
def test_a_damaged_sweep_record_is_said_and_rewritten(tmp_path, capsys):
    from hvd_ba.launch.sweep import make_cells, say_grid_changes

    cells = make_cells([("data.copies", ["1", "2"])], [0], [])
    for text in ('{"grid": ', '{"grid": 5, "seeds": [0]}', "[1]", '{"seeds": [0]}'):
        (tmp_path / "sweep.json").write_text(text)
        say_grid_changes(tmp_path, cells, {"set": [], "config": "demo"})
        assert "does not read as a sweep's record (damaged or of another version)" in capsys.readouterr().out, text


@pytest.mark.unit
def test_a_damaged_staging_record_is_said_and_every_file_hashed_again(tmp_path, capsys):
    from hvd_ba.launch.stage import previous_hashes

    record = tmp_path / "rank0-of2.json"
    assert previous_hashes(record) == {} and capsys.readouterr().err == ""  # none yet: nothing to say
    record.write_text(json.dumps({"sha256": {"train/a/1.JPEG": "ab"}}))
    assert previous_hashes(record) == {"train/a/1.JPEG": "ab"}
    for damaged in ('{"sha256": {"train/a', '[1, 2]', '{"sha256": [1]}', '{"files": 3}'):
        record.write_text(damaged)
        assert previous_hashes(record) == {}, damaged
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{record} is damaged or not a staging record" in err, (damaged, err)
    record.unlink()
    record.mkdir()
    assert previous_hashes(record) == {} and "is damaged" in capsys.readouterr().err


def usage_aside(stderr: str) -> list[str]:
    """stderr without argparse's usage lines (the usage line and its indented continuations)."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):
            continue
        in_usage = False
        lines.append(line)
    return lines


def bad_input_table(tmp):
    """(command line, exit status, what the one line says): every command of `python -m hvd_ba
    --help` with bad flags or files. A new command joins the table (test_the_table_covers...)."""
    files = tmp / "files"
    damaged_files(files)
    (tmp / "empty").mkdir()
    (tmp / "a-file").write_text("x")
    (tmp / "binary.yaml").write_bytes(b"\x00\xff\xfe not text")
    (tmp / "ds" / "train").mkdir(parents=True)
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (tmp / "torn-analysis" / "analysis").mkdir(parents=True)
    (tmp / "torn-analysis" / "analysis" / "lambda-max-step10.json").write_text('{"kinds": ')
    return [
        (["train", "--config", "nope"], 2, "config file 'nope' not found"),
        (["train", "--set", "model.arch=resnet5"], 2, "config key 'model.arch': must be one of"),
        (["train", "--set", "data.copies=2", "--set", "data.copies=x"], 2, "config key 'data.copies': expected an integer"),
        (["train", "--track-lambda-every", "0"], 2, "argument --track-lambda-every: '0' is not a positive integer"),
        (["demo", "--np", "0"], 2, "argument --np: '0' is not a positive integer"),
        (["demo", "--np", "1" + "0" * 400], 2, "argument --np: '1000000000000000000000000000000000000000'... is not"),
        (["hosts", "--nodelist", "n[1-" + "9" * 5000 + "]", "--tasks-per-node", "1"], 2, "is not a number or a range"),
        (["demo", "--controller", "ucx"], 2, "argument --controller: invalid choice: 'ucx'"),
        (["demo", "--config", "nope"], 2, "config file 'nope' not found"),  # before the demo data is written
        (["make-data", str(tmp / "md"), "--classes", "0"], 2, "argument --classes: '0' is not an integer from 1 to 10"),
        (["make-data", str(tmp / "md"), "--classes", "11"], 2, "'11' is not an integer from 1 to 10"),
        (["make-data", str(tmp / "md"), "--train-per-class", "-1"], 2, "'-1' is not a positive integer"),
        (["plan", "--ranks", "0"], 2, "argument --ranks: '0' is not a positive integer"),
        (["plan", "--ranks", "2", "--config", "nope"], 2, "config file 'nope' not found"),
        (["plan", "--ranks", "2", "--set", "data.copies=0"], 2, "data.copies"),
        (["plan", "--ranks", "2", "--config", str(tmp / "binary.yaml")], 2, "not a text file (UTF-8 YAML expected)"),
        (["plan", "--ranks", "2", "--set", f"data.path={tmp / 'ds'}", f"data.manifest_dir={tmp / 'a-file'}"], 2,
         f"config key 'data.manifest_dir': '{tmp / 'a-file'}' is a file, not a folder"),
        (["plan", "--ranks", "2", "--config", str(tmp / "empty")], 2, f"config file '{tmp / 'empty'}': a folder"),
        (["hosts", "--np", "0"], 2, "argument --np: '0' is not a positive integer"),
        (["hosts", "n[1-"], 2, "unrecognized arguments: n[1-"),
        (["hosts", "--nodelist", "n[1-100000000]", "--tasks-per-node", "1"], 2, "names more than 100000 hosts"),
        (["hosts", "--nodelist", "n[1-2]", "--tasks-per-node", "1(x100000000)"], 2, "more than 100000 nodes"),
        (["settings", "a=[1,"], 2, "'a=[1,' opens a '[' or '{' that is never closed"),
        (["settings", "a='x"], 2, "No closing quotation"),
        (["settings", "novalue"], 2, "'novalue' is not a section.key=value override"),
        (["pack", "a", "b", "--shard-size", "0"], 2, "argument --shard-size: '0': a shard size between 1 byte and 1 PiB"),
        (["pack", "a", "b", "--shard-size", "lots"], 2, "argument --shard-size: 'lots' is not a size (e.g. 1G"),
        (["pack", str(tmp / "ds")], 2, "pack needs SRC and DST (or --from-tar TRAIN_TAR DST, or --verify DST)"),
        (["pack", "--verify", str(tmp / "ds"), str(tmp / "pk")], 2, "--verify takes DST alone"),
        (["pack", "--from-tar", "x.tar", str(tmp / "ds"), str(tmp / "pk")], 2, "--from-tar packs the archives into DST"),
        (["pack", str(tmp / "ds"), str(tmp / "pk"), "--val-tar", "v.tar"], 2, "--val-tar goes with --from-tar"),
        (["pack", str(tmp / "empty"), str(tmp / "pk")], 1, "is not an ImageNet layout (SRC/train/<class>/<image>"),
        (["pack", str(tmp / "ds"), str(tmp / "pk")], 1, "has no class folders"),
        (["pack", "--verify", str(tmp / "empty")], 1, f"'{tmp / 'empty'}' is not a packed folder (no train.json"),
        (["stage", "--threads", "0"], 2, "argument --threads: '0' is not a positive integer"),
        (["stage"], 2, "stage: give --dest DIR (or config key 'data.local_path')"),
        (["stage", "--dest", str(tmp / "local"), "--config", "nope"], 2, "config file 'nope' not found"),
        (["analyze", "lambda-max", "--run", str(tmp / "run"), "--checkpoint", str(files / "truncated.pt")], 2,
         f"--checkpoint '{files / 'truncated.pt'}': truncated, damaged or not a torch file"),
        (["analyze", "lambda-max", "--run", str(tmp / "run"), "--checkpoint", str(files / "code.pt")], 2,
         "holds Python objects other than tensors"),
        (["analyze", "lambda-max", "--run", str(tmp / "nope")], 2, f"run directory '{tmp / 'nope'}' has no valid checkpoint"),
        (["analyze", "grad-variance", "--copies-list", "1,0"], 2, "argument --copies-list: '1,0': give M as positive"),
        (["analyze", "lambda-max", "--tol", "-1"], 2, "argument --tol: '-1' is not a number >= 0"),
        (["analyze", "lambda-max", "--tol", "inf"], 2, "argument --tol: 'inf' is not a number >= 0"),
        (["analyze", "lambda-max", "--checkpoint", str(files / "truncated.pt")], 2, "--checkpoint"
         f" '{files / 'truncated.pt'}' needs --run"),
        (["plot", str(tmp / "nope")], 2, f"run directory '{tmp / 'nope'}' does not exist"),
        (["plot", str(tmp / "empty")], 2, "nothing to plot"),
        (["plot", str(tmp / "foreign")], 2, "metrics.jsonl' record 1: not a record of hvd_ba's (no train_top1)"),
        (["plot", str(tmp / "torn-analysis")], 2, "lambda-max-step10.json': not an analysis hvd_ba analyze wrote"),
        (["plot", str(tmp / "torn-analysis"), "--out", str(tmp / "a-file")], 2, "is a file, not a folder"),
        (["status", str(tmp / "nope")], 3, f"no run at '{tmp / 'nope'}': no such folder"),
        (["status", str(tmp / "empty")], 3, "the folder holds no config.yaml or result.json"),
        (["status", str(tmp / "a-file")], 3, "a file, not a run folder"),
        (["status", "--complete", str(tmp / "nope")], 1, "no such folder"),
        (["sweep", "--grid", "x"], 2, "--grid 'x': expected section.key=v1,v2,..."),
        (["sweep", "--np", "0", "--grid", "data.copies=1"], 2, "argument --np: '0' is not a positive integer"),
        (["sweep", "--grid", "data.copies=2", "--launcher", "horovodrun", "--out", str(tmp / "a-file")], 2,
         f"--out '{tmp / 'a-file'}': a file, not a folder"),
        (["sweep", "--cell-timeout", "0", "--grid", "data.copies=1"], 2, "argument --cell-timeout: '0' is not a positive"),
        (["doctor", "--config", "nope"], 2, "config file 'nope' not found"),
        (["doctor", "--set", "data.copies=0"], 2, "doctor --set: give --config too"),
        (["doctor", "--config", "demo", "--set", "data.copies=0"], 2, "config key 'data.copies'"),
        (["bench", "loader", "--copies", "0", "--images", "8"], 2, "argument --copies: '0': give M as positive integers"),
        (["bench", "loader", "--images", "0"], 2, "argument --images: '0' is not a positive integer"),
        (["bench", "loader", "--images", "8", "--corpus", str(tmp / "a-file")], 2,
         f"--corpus '{tmp / 'a-file'}': {tmp / 'a-file'} is a file, not a folder"),
        (["bench", "gpu", "--where", "cpu"], 2, "argument --where: 'cpu': give loader, device or loader,device"),
        (["bench", "gpu", "--model", "resnet5"], 2, "argument --model: invalid choice: 'resnet5'"),
        (["bench", "breakdown", "--copies", "1,x"], 2, "argument --copies: '1,x'"),
        (["bench", "scaling", "--bandwidths-gbit", "10,x"], 2, "argument --bandwidths-gbit: '10,x': give positive numbers"),
        (["bench", "scaling", "--bandwidths-gbit", "10,inf"], 2, "argument --bandwidths-gbit: '10,inf': give positive"),
        (["bench", "scaling", "--np", "0"], 2, "argument --np: '0' is not a positive integer"),
        (["bench", "scaling", "--overlap", "2"], 2, "argument --overlap: '2': give none, measured or a fraction in [0, 1]"),
        (["bench", "scaling", "--backends", "gloo,nccl"], 2, "argument --backends: 'gloo,nccl': nccl unknown"),
    ]


@pytest.mark.unit
def test_every_commands_bad_input_is_one_line_and_a_non_zero_exit(tmp_path, monkeypatch):
    """In this process (the unit tier's guard fails the test if a command starts any process):
    each case exits with its status and prints one line (argparse's usage aside), no traceback,
    and leaves no folder it would have written."""
    from helpers import cli

    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.chdir(tmp_path)
    for args, status, line in bad_input_table(tmp_path):
        r = cli(*args)
        lines = usage_aside(r.stderr)
        assert r.returncode == status and len(lines) == 1 and line in lines[0], (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stdout + r.stderr, args
    assert not (tmp_path / "md").exists() and not (tmp_path / "data").exists() and not (tmp_path / "pk").exists()
    assert not (tmp_path / "files" / "code-ran").exists()
    # a folder named like a preset (runs/demo is the demo's own run folder) does not hide the preset
    (tmp_path / "demo").mkdir()
    assert cli("plan", "--ranks", "1", "--config", "demo").returncode == 0
    # a run folder whose `latest` is not text and whose only checkpoint lacks its step: status
    # reads it as a run without a resume point (not complete: 1), no traceback
    run = tmp_path / "damaged-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run_id: r1\n")
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    torch.save({"format": 2, "model": {}}, run / "checkpoints" / "ckpt-000000003.pt")
    r = cli("status", str(run))
    assert r.returncode == 1 and "resume point: -" in r.stdout and "Traceback" not in r.stdout + r.stderr, r
    (run / "metrics.jsonl").mkdir()  # a folder where the epoch records go: said, the rest still shown
    r = cli("status", str(run))
    assert r.returncode == 1 and "epochs recorded: - (" in r.stdout and "Is a directory" in r.stdout, r
    assert "Traceback" not in r.stdout + r.stderr and "lock: -" in r.stdout, r


@pytest.mark.unit
def test_the_table_covers_every_command(tmp_path):
    from hvd_ba.__main__ import COMMANDS

    covered = {args[0] for args, _, _ in bad_input_table(tmp_path)}
    assert covered == set(COMMANDS), set(COMMANDS) ^ covered


@pytest.mark.integration
def test_an_early_exit_with_loader_workers_prints_only_its_line(small_data, tmp_path):
    """A full disk at the checkpoint of step 4 (ENOSPC injected at its write) with a loader worker:
    exit 74 and the one line, no resource tracker warning of leaked semaphores after it (before:
    "There appear to be 22 leaked semaphore objects"). The same for a truncated run.resume file and
    one that carries code (never run)."""
    from helpers import train_alone

    settings = ["data.workers=1", "data.copies=2", "data.unique_batch=8", "model.ghost_size=16", "optim.epochs=1",
                "optim.warmup_epochs=0", "run.max_steps_per_epoch=4", "run.checkpoint_every=2",
                "data.manifest_dir=null"]
    io_log = tmp_path / "io.log"
    r = train_alone(small_data, tmp_path / "first", settings, env_extra={"HVD_BA_IO_LOG": str(io_log)})
    assert r.returncode == 0, r.stderr[-2000:]
    k = next(int(op.split()[0]) for op in io_log.read_text().splitlines()
             if "ckpt-000000004" in op and op.split()[1] == "write")
    r = train_alone(small_data, tmp_path / "full", settings, env_extra={"HVD_BA_FAIL_AT": f"{k}:ENOSPC"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 74 and len(lines) == 1 and "no space left on device" in lines[0], r.stderr[-3000:]
    assert "leaked semaphore" not in r.stdout + r.stderr
    truncated, code = tmp_path / "truncated.pt", tmp_path / "code.pt"
    truncated.write_bytes((tmp_path / "first" / "checkpoints" / "ckpt-000000004.pt").read_bytes()[:5000])
    code.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "code-ran").encode() + b"'\ntR.")
    no_config = tmp_path / "no-config.pt"  # loads, but lacks what a resume reads (KeyError 'config' before)
    payload = torch.load(tmp_path / "first" / "checkpoints" / "ckpt-000000004.pt", weights_only=True)
    torch.save({key: value for key, value in payload.items() if key != "config"}, no_config)
    for damaged, why in ((truncated, "cannot load '{}' (truncated, damaged or not a torch file"),
                         (code, "cannot load '{}' (it holds Python objects other than tensors"),
                         (no_config, "checkpoint '{}' holds no config or optimizer state")):
        r = train_alone(small_data, tmp_path / f"resumed-{damaged.stem}", [*settings, f"run.resume={damaged}"])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].startswith("hvd_ba: error: run.resume: " + why.format(damaged)), lines[0]
        assert "leaked semaphore" not in r.stdout + r.stderr
    assert not (tmp_path / "code-ran").exists()
    # a data set with fewer files than one batch (a traceback from the sampler before)
    from hvd_ba.data.synthetic import make_dataset

    make_dataset(tmp_path / "tiny", num_classes=2, train_per_class=2, val_per_class=1, seed=1)
    r = train_alone(tmp_path / "tiny", tmp_path / "tiny-run", settings)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "config key 'data.path': its 4 training files over 1 rank give fewer than one batch of " \
           "data.unique_batch 8 per rank" in lines[0], lines[0]
