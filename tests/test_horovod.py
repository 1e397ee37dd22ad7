"""Real multi-rank runs: `horovodrun -np 2` over Gloo and over MPI."""
import importlib.util
import json
import re
import subprocess
import sys

import pytest

from helpers import ENV, ROOT, launch, read_jsonl, short_run, train_command

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_ranks_train_in_lockstep_on_disjoint_shards(controller, small_data, tmp_path):
    out = tmp_path / "run"
    r = launch(controller, small_data, out, extra=["optim.epochs=2"] if controller == "mpi" else [])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    # Both ranks hold identical parameters after training, and after the final evaluation's
    # averaging of the rank-local BN running statistics, identical full state.
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    assert ranks[0]["world"] == 2 and ranks[0]["steps"] == ranks[1]["steps"] > 0
    metrics = read_jsonl(out / "metrics.jsonl")
    per_rank = (4 * 48) // 2
    for record in metrics:
        epoch = str(record["epoch"] - 1)
        shards = [ranks[i]["reads"][epoch] for i in (0, 1)]
        # each rank read its own shard: disjoint, each file once, the whole set between them
        assert len(shards[0]) == len(shards[1]) == per_rank
        assert len(set(shards[0])) == per_rank and not set(shards[0]) & set(shards[1])
        assert set(shards[0]) | set(shards[1]) == set(range(4 * 48))
        assert record["unique_images"] == 2 * per_rank and record["samples"] == 2 * 2 * per_rank
        assert record["val_images"] == 4 * 12  # exact evaluation: every val file once
    if controller == "gloo":  # the loss went down: last two epochs against the first two
        first = sum(m["train_loss"] for m in metrics[:2]) / 2
        last = sum(m["train_loss"] for m in metrics[-2:]) / 2
        assert last < first - 0.05, [m["train_loss"] for m in metrics]
    result = json.loads((out / "result.json").read_text())
    assert result["world"] == 2 and 0 <= result["val_top1"] <= 100
    assert (out / "config.yaml").is_file() and (out / "steps.jsonl").is_file()
    import csv

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [m["epoch"] for m in metrics]
    assert float(rows[-1]["val_top1"]) == pytest.approx(metrics[-1]["val_top1"])
    # the start of the run prints the derived figures
    for line in ("unique batch: 8 per rank, 16 global; copies M = 2", "samples per step: 16 per rank, 32 global",
                 "ghost BN: 1 groups of 16 per rank (split)", "steps per epoch: 12 (those of unique batch 16)"):
        assert line in r.stdout, line


def test_failing_rank_stops_the_job(small_data, tmp_path):
    """A rank that raises (here rank 0: an I/O error, EIO, at its first file operation, the write
    of config.yaml) ends the whole job with a traceback naming the rank, not a hang."""
    r = subprocess.run(train_command("gloo", small_data, tmp_path / "run"), capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**ENV, "HVD_BA_FAIL_AT": "1:EIO", "HVD_BA_CRASH_RANK": "0"})
    output = r.stdout + r.stderr
    assert r.returncode != 0, output[-3000:]
    assert "hvd_ba: rank 0 failed:" in output and "Traceback" in output, output[-3000:]
    assert "OSError: [Errno 5] Input/output error" in output, output[-3000:]


def test_bytes_read_per_rank_do_not_depend_on_m(small_data, tmp_path):
    m1, _ = short_run(small_data, tmp_path / "m1", "data.copies=1", "model.ghost_size=8")
    m8, _ = short_run(small_data, tmp_path / "m8", "data.copies=8", "model.ghost_size=64")
    for key in ("bytes_read_per_rank", "files_read_per_rank"):
        assert m1[0][key] == m8[0][key], key
    assert m1[0]["files_read_per_rank"] == [6 * 8, 6 * 8]  # 6 steps x 8 unique images, read once each
    assert min(m1[0]["bytes_read_per_rank"]) > 6 * 8 * 1000
    assert m8[0]["samples"] == 8 * m1[0]["samples"] == 8 * 2 * 6 * 8


def test_static_shards_are_owned_for_the_whole_run(small_data, tmp_path):
    _, ranks = short_run(small_data, tmp_path / "static", "data.shard=static", "optim.epochs=3",
                         "run.max_steps_per_epoch=null")
    reads = [{e: set(v) for e, v in r["reads"].items()} for r in ranks]
    for rank in reads:
        assert rank["0"] == rank["1"] == rank["2"]  # the same files every epoch
    assert not reads[0]["0"] & reads[1]["0"]
    assert reads[0]["0"] | reads[1]["0"] == set(range(4 * 48))  # the union over the run is the set
    assert ranks[0]["reads"]["0"] != ranks[0]["reads"]["1"]  # reshuffled within the shard


def test_resnet50_paper_preset_runs_a_few_steps(small_data, tmp_path):
    """The paper's ResNet-50 preset (M = 4, ghost BN of 64, zero-init residual gammas) at 64 px."""
    out = tmp_path / "r50"
    settings = ["data.unique_batch=16", "data.workers=0", "augment.size=64", "augment.eval_resize=73",
                "augment.eval_crop=64", "optim.epochs=1", "optim.warmup_epochs=1", "run.max_steps_per_epoch=2", "run.log_every=1"]
    r = launch("gloo", small_data, out, preset="resnet50", settings=settings)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ghost BN: 1 groups of 64 per rank (split)" in r.stdout
    assert "peak LR: 0.0125 = 0.1 x 32 / 256" in r.stdout
    steps = read_jsonl(out / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps)
    import torch
    import torchvision

    plain = torchvision.models.resnet50(num_classes=4)
    plain.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)


@pytest.mark.parametrize("controller, options", [
    ("gloo", ["optim.fp16_allreduce=true", "optim.gradient_predivide_factor=2.0"]),
    ("mpi", ["optim.adasum=true"]),
])
def test_allreduce_options_keep_ranks_in_lockstep(controller, options, small_data, tmp_path):
    out = tmp_path / "run"
    r = launch(controller, small_data, out, extra=["optim.epochs=1", "run.max_steps_per_epoch=4", *options])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"] and ranks[0]["steps"] == 4


# A rank that stops on SIGTERM with 75 (its checkpoint written) and kills its own child (a loader
# worker, which ignores SIGTERM), run as horovodrun runs each rank: under a shell that does not
# exec it (dash's `sh -c "cd ...; env ... python ..."`), or that does (bash, /bin/sh on RHEL). The
# stop comes once the rank is up, from the event horovodrun sets on Ctrl-C or SIGTERM. Unpatched,
# about 2 of 10 stops under dash returned 0, and every one under bash 137 (no checkpoint).
STOPPED_RANK = r"""
import shlex, subprocess, sys, threading
from horovod.runner.common.util import safe_shell_exec
RANK = ("import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'], stdout=subprocess.DEVNULL)\n"
        "def stop(*_):\n    child.kill()\n    sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, stop)\nprint('up', flush=True)\ntime.sleep(60)\n")
class Watch:  # the rank's output, as horovodrun forwards it: the stop once the rank says it is up
    def __init__(self, stop):
        self.stop = stop
    def write(self, text):
        if "up" in text:
            self.stop.set()
    def flush(self):
        pass
def main(how, times):
    command = "cd / >/dev/null 2>&1; " + ("exec " if how == "exec" else "") + sys.executable + " -c " + shlex.quote(RANK)
    codes = []
    for _ in range(times):
        stop = threading.Event()
        threading.Timer(20, stop.set).start()  # a rank that never says it is up is stopped all the same
        codes.append(safe_shell_exec.execute(command, events=[stop], index=0, stdout=Watch(stop)))
    print("codes", *codes)
main(sys.argv[1], int(sys.argv[2]))
"""


@pytest.mark.parametrize("shell", ["no-exec", "exec"])
def test_horovodrun_reports_each_stopped_ranks_own_status(shell):
    """cluster/patch_horovod.py: horovodrun's middleman reports the stopped rank's 75 every time,
    at once: unpatched, its terminate thread reaped the shell, so that Popen.wait() read 0, or froze
    it between the rank's exit and its own (137 after 10 s); where the shell exec'd the rank, the
    rank never got SIGTERM and was killed (137)."""
    import time

    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", STOPPED_RANK, shell, "10"], capture_output=True, text=True, timeout=400,
                       env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = r.stdout.split("codes", 1)[1].split()
    assert codes == ["75"] * 10, codes
    assert time.time() - t0 < 60, time.time() - t0  # no grace period spent: ten stops of about 1 s


def load_patch_module():
    spec = importlib.util.spec_from_file_location("patch_horovod", ROOT / "cluster" / "patch_horovod.py")
    patch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patch)
    return patch


def test_the_launcher_patches_are_applied_once_and_refuse_another_text(tmp_path):
    patch = load_patch_module()
    for which in patch.PATCHES:
        installed = patch.target(which).read_text()
        assert installed.count(which.marker) == 1, which.what  # cluster/setup.sh applied it to this Horovod
        unpatched = tmp_path / f"unpatched-{which.marker[-2:]}.py"  # the installed text with the patch taken out
        unpatched.write_text(installed.replace(which.patched, which.original))
        assert which.marker not in unpatched.read_text()
        paths = [unpatched]
        if which is patch.EXIT_STATUS:
            assert "p.wait(timeout=GRACEFUL" in unpatched.read_text()
            earlier = tmp_path / "earlier.py"  # an earlier version of the patch: replaced
            earlier.write_text(unpatched.read_text().replace("    # If the shell already ends",
                                                             "    # hvd_ba patch v1\n    # If the shell already ends"))
            paths.append(earlier)
        else:
            assert "def _check_extension_lambda_uncached" not in unpatched.read_text()
            earlier = tmp_path / "earlier-build-check.py"  # its v1: replaced
            earlier.write_text(installed.replace(which.marker, "# hvd_ba build-check cache v1").replace(
                "st.st_ino, st.st_ctime_ns", "st.st_ino"))
            assert which.marker not in earlier.read_text()
            paths.append(earlier)
        for path in paths:
            path.chmod(0o640)  # its mode is kept (the replacement is written under this process's umask)
            assert patch.main([str(path)]) == 0
            text = path.read_text()
            assert text.count(which.marker) == 1, path
            assert text == installed, path  # the same file as setup.sh made
            assert path.stat().st_mode & 0o777 == 0o640, oct(path.stat().st_mode)
            assert patch.main([str(path)]) == 0 and path.read_text() == installed  # twice: nothing more
    other = tmp_path / "other.py"
    other.write_text("def terminate_executor_shell_and_children(pid):\n    pass\n\n\ndef prefix_connection(x):\n"
                     "    pass\n")
    assert patch.main([str(other)]) == 1 and "hvd_ba" not in other.read_text()
    other.write_text("def _check_extension_lambda(ext_base_name, fn, fn_desc, verbose):\n    return None\n\n\n"
                     "def extension_available(x):\n    pass\n")
    assert patch.main([str(other)]) == 1 and "hvd_ba" not in other.read_text()


def test_horovodrun_keeps_its_build_checks_per_build(tmp_path):
    """horovodrun asks how the extension was built once per build (each answer imports torch in a
    forked process); the kept answer is read (here a false one, planted: horovodrun then refuses
    Gloo), and one for another build of the library is not, nor by `--check-build --verbose`."""
    cache = tmp_path / "cache"
    env = {**ENV, "HVD_BA_CACHE": str(cache)}
    command = [*train_command("gloo", tmp_path, tmp_path)[:6], sys.executable, "-c", "pass"]
    assert command[1:6] == ["-np", "2", "-H", "localhost:2", "--gloo"], command

    def horovodrun(*options):
        return subprocess.run([command[0], *options, *command[1:]], capture_output=True, text=True, env=env,
                              timeout=120)

    r = horovodrun()
    assert r.returncode == 0, r.stderr[-3000:]
    kept_file = cache / "horovod-build-checks.json"
    kept = json.loads(kept_file.read_text())
    (key, answer), = kept.items()  # only the Gloo answer: nothing for TensorFlow, no "running with GPU"
    assert key.startswith("built with Gloo|") and "/horovod/torch/mpi_lib" in key and answer is True, kept
    library, framework = key.split("|")[1:]
    assert "/torch/__init__.py:" in framework, key  # a reinstalled torch asks again
    planted = {key: False}
    kept_file.write_text(json.dumps(planted))  # the kept answer is what horovodrun goes by
    r = horovodrun()
    assert r.returncode != 0 and "Gloo support has not been built" in r.stderr, r.stderr[-3000:]
    check = [command[0], "--check-build"]
    r = subprocess.run(check, capture_output=True, text=True, env=env, timeout=120)
    assert re.search(r"\[ \] Gloo\s*\n", r.stdout.split("Controllers")[1]), r.stdout  # the kept answer
    kept = json.loads(kept_file.read_text())  # with the answers it asked for (MPI, DDL, CCL; NCCL is a number)
    assert kept[key] is False and {k.split("|")[0] for k in kept} == {
        "built with Gloo", "built with MPI", "built with DDL", "built with CCL"}, kept
    r = subprocess.run([command[0], "--verbose", "--check-build"], capture_output=True, text=True, env=env, timeout=120)
    assert re.search(r"\[X\] Gloo\s*\n", r.stdout.split("Controllers")[1]), r.stdout  # verbose: asked
    assert json.loads(kept_file.read_text()) == kept  # and nothing kept from a verbose check
    # the same answer for another build of the library (each of size, mtime, inode, ctime): asked again
    path, *stat = library.rsplit(":", 4)
    for field in range(4):
        other = [*stat[:field], str(int(stat[field]) + 1), *stat[field + 1:]]
        kept_file.write_text(json.dumps({"|".join(["built with Gloo", ":".join([path, *other]), framework]): False}))
        r = horovodrun()
        assert r.returncode == 0, (field, r.stderr[-3000:])
        assert json.loads(kept_file.read_text())[key] is True, field
