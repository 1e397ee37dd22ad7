"""The GPU path, checked on the CPU: channels_last and fp16 resume under horovodrun, the device
choice and the refusals (pure functions of what the launcher and driver say), doctor. Tests that
need a GPU are marked `gpu` and run where one is."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from hvd_ba.train.checkpoint import checkpoint_dir, find_checkpoint
from hvd_ba.train.devices import DeviceError, gpu_index, nccl_problem, shared_gpus
from helpers import ENV, ROOT, RUN, kill_tree, launch, read_jsonl, run_cli, train_command, wait_for_step


@pytest.mark.integration
@pytest.mark.parametrize("switch", ["run.channels_last=true", "run.compile=true"])
def test_channels_last_and_compile_train_resume_and_keep_ranks_identical(switch, small_data, tmp_path):
    """Measured before: channels_last stopped every run at start-up (Horovod refuses the
    non-contiguous weights of a channels_last model)."""
    settings = [*RUN, switch, "optim.epochs=1"]
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command("gloo", small_data, out, settings=settings), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    try:
        wait_for_step(out, 3, proc, timeout=400)
    finally:
        kill_tree(proc)
    # the ranks go on while the kill is on its way: the checkpoint of step 2 or, on a busy machine, of step 4
    saved_path, saved = find_checkpoint("auto", out)
    assert saved["step"] in (2, 4), saved["step"]
    r = launch("gloo", small_data, out, settings=[*settings, "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {saved_path}" in r.stdout + r.stderr
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == list(range(1, 7))
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"] and ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    assert json.loads((out / "result.json").read_text())["val_top1"] is not None


@pytest.mark.integration
def test_fp16_resume_gives_every_rank_the_checkpoints_grad_scale(small_data, tmp_path):
    """Before: only rank 0 loaded the GradScaler state, the others restarted at 65536, so their
    gradients were scaled differently and the weights drifted apart."""
    # fp16 on a CPU runs at a few percent of fp32's speed: 2 steps an epoch of 32 px crops
    settings = [*RUN, "run.amp=fp16", "optim.epochs=2", "run.max_steps_per_epoch=2", "augment.size=32",
                "augment.eval_resize=36", "augment.eval_crop=32"]
    out = tmp_path / "run"
    r = launch("gloo", small_data, out, settings=[*settings, "optim.epochs=1"])
    assert r.returncode == 0, r.stdout[-3000:]
    # a stand-in scaler state, as a run that backed off a few times would have
    path = checkpoint_dir(out) / "ckpt-000000002.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["scaler"]["scale"] == 65536.0
    payload["scaler"].update(scale=1024.0, _growth_tracker=5)
    torch.save(payload, path)
    r = launch("gloo", small_data, out, settings=[*settings, "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == [1, 2, 3, 4]  # the resumed run trained
    assert ranks[0]["grad_scale"] == ranks[1]["grad_scale"] == 1024.0
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]


@pytest.mark.unit
def test_gpu_index_follows_the_launcher():
    assert gpu_index(local_rank=3, device_count=8, visible=None) == 3
    assert gpu_index(local_rank=3, device_count=1, visible="5") == 0  # Slurm gave the task its own GPU
    assert gpu_index(local_rank=1, device_count=4, visible="0,1,2,3") == 1
    with pytest.raises(DeviceError, match=r"local rank 4 but only 4 GPUs visible .*at most 4 ranks per node"):
        gpu_index(local_rank=4, device_count=4, visible="0,1,2,3")


@pytest.mark.unit
def test_two_ranks_on_one_gpu_and_a_horovod_without_nccl_are_refused():
    assert shared_gpus([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")]) is None  # same UUID, other host
    message = shared_gpus([("n1", "GPU-a"), ("n1", "GPU-a"), ("n2", "GPU-c")])
    assert message.startswith("ranks 0, 1 on host n1 all use GPU GPU-a: give each rank its own GPU")
    assert nccl_problem(uses_cuda=True, nccl_built=False).startswith("this Horovod was built without NCCL")
    assert nccl_problem(uses_cuda=True, nccl_built=True) is None and nccl_problem(False, False) is None


@pytest.mark.integration
def test_model_pt_is_saved_on_the_cpu(small_data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--config", "demo", "--set", f"data.path={small_data}", f"run.out_dir={out}", *RUN,
                "optim.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    state = torch.load(out / "model.pt", weights_only=True)  # plain torch.load, no map_location
    assert all(t.device.type == "cpu" for t in state.values())


@pytest.mark.integration
def test_doctor_reports_and_survives_a_broken_horovod(tmp_path):
    r = run_cli("doctor", "--config", "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("python", "torch", "horovod", "pillow", "mpi", "slurm", "cores", "threads", "shm"):
        assert f" {name} " in r.stdout, name
    broken = tmp_path / "site" / "horovod"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libhorovod_torch.so: undefined symbol')\n")
    r = run_cli("doctor", env_extra={"PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"})
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "FAIL horovod  horovod does not import (ImportError: libhorovod_torch.so: undefined symbol)" in r.stdout


@pytest.mark.integration
def test_doctor_warns_when_threads_and_workers_exceed_the_cores():
    if shutil.which("taskset") is None:
        pytest.skip("taskset not installed")
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "hvd_ba", "doctor", "--config", "demo", "--set",
                        "data.workers=2"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "1 of the node's" in r.stdout and "WARN threads  run.threads 1 + data.workers 2 on 1 cores" in r.stdout


@pytest.mark.integration
def test_doctor_under_horovodrun_prints_every_rank_once(tmp_path):
    from hvd_ba.launchers import horovodrun_path

    r = subprocess.run([horovodrun_path(), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "hvd_ba",
                        "doctor"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.stdout.count("== rank 0 on") == 1 and r.stdout.count("== rank 1 on") == 1, r.stdout[-3000:]


@pytest.mark.integration
def test_the_gpu_check_imports_and_builds_its_configs_without_pyyaml():
    """cluster/gpu_check.sh runs where only torch is installed: PyYAML is imported only where a
    file or a --set value is read or written, never on the GPU check's way (an `import yaml` at
    config.py's module level fails this, in seconds rather than the whole check's minutes)."""
    code = textwrap.dedent("""
        import sys

        class NoYaml:
            def find_spec(self, name, path=None, target=None):
                if name == "yaml" or name.startswith("yaml."):
                    raise ImportError(f"{name} is blocked")

        sys.modules.pop("yaml", None)
        sys.meta_path.insert(0, NoYaml())
        import torch
        from hvd_ba.bench import gpu_check
        from hvd_ba.bench.corpus import loader_config
        from hvd_ba.bench.gpu import preset_ghost_size

        cfg, state = gpu_check._state("small_resnet", torch.device("cpu"), "off", channels_last=False, classes=10)
        bench = loader_config("corpus", 2, 8, 64, 1, "device", 3)
        assert (cfg.model.ghost_size, bench.augment.where, preset_ghost_size()) == (32, "device", 64)
        assert "yaml" not in sys.modules
        try:
            import yaml
        except ImportError as err:
            print(err)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "yaml is blocked", r.stdout + r.stderr[-3000:]


@pytest.mark.integration
def test_gpu_check_reduced_form_runs_with_only_torch(tmp_path):
    """cluster/gpu_check.sh where only torch and torchvision are installed: Horovod, PyYAML, tqdm
    and scikit-image made unimportable. The reduced (CPU) form; every part runs."""
    blocked = tmp_path / "blocked"
    for name in ("horovod", "yaml", "tqdm", "skimage", "mpi4py"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "cluster" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600, env={**ENV, "PYTHONPATH": str(blocked)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["reduced"] is True
    for part in ("train_steps", "device_crops", "checkpoint_resume", "bench_gpu"):
        assert result[part]["ok"], (part, result[part])
    assert result["train_steps"]["fp16"]["grad_scale"] > 0 and result["train_steps"]["bf16"]["finite"]
    assert result["checkpoint_resume"]["abs_diff"] == 0.0
    assert result["device_crops"]["mean_abs_diff_0_255"] < 3.0
    assert {(row["copies"], row["where"]) for row in result["bench_gpu"]["rows"]} == {
        (1, "loader"), (1, "device"), (2, "loader"), (2, "device")}


@pytest.mark.integration
@pytest.mark.gpu
def test_gpu_check_full_form_on_a_gpu(tmp_path):
    from helpers import GPU_ENV, has_gpu

    if not has_gpu():
        pytest.skip("no GPU on this machine")
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "cluster" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600, env={**GPU_ENV, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["reduced"] is False and result["checkpoint_resume"]["cuda_rng_saved"]
    assert result["checkpoint_resume"]["abs_diff"] < 1e-4


@pytest.mark.unit
def test_bn_statistics_are_averaged_in_one_grouped_allreduce(monkeypatch):
    """Before: two blocking allreduces per BN layer (106 for ResNet-50) at every evaluation and checkpoint."""
    from hvd_ba import dist
    from hvd_ba.train.engine import average_bn_statistics
    from hvd_ba.models import build_model

    calls = []

    class FakeHorovod:
        Average, Sum = "avg", "sum"

        class Compression:
            none = fp16 = None

        def allreduce(self, tensor, **kwargs):
            calls.append(("allreduce", 1))
            return tensor

        def grouped_allreduce(self, tensors, **kwargs):
            calls.append(("grouped_allreduce", len(tensors)))
            return [t + 1 for t in tensors]

    monkeypatch.setattr(dist, "_hvd", FakeHorovod())
    model = build_model("resnet50", 10, ghost_size=64)
    before = model.bn1.running_var.clone()
    average_bn_statistics(model)
    assert calls == [("grouped_allreduce", 106)]
    assert torch.equal(model.bn1.running_var, before + 1)  # the averages are written back


@pytest.mark.unit
def test_a_training_step_does_not_read_the_device(monkeypatch):
    """Losses and correct counts stay tensors; the loop reads them at log lines and agreements only."""
    from hvd_ba.config import load_config
    from hvd_ba.train.engine import Meter, TrainState, train_step
    from hvd_ba.models import build_model, parameter_groups

    cfg = load_config("demo", ["model.ghost_impl=accumulate"])
    model = build_model("small_resnet", 4, ghost_size=32)
    opt = torch.optim.SGD(parameter_groups(model, 1e-4), lr=0.1, momentum=0.9)
    state = TrainState(model=model, optimizer=opt, device=torch.device("cpu"), mean=torch.zeros(1, 3, 1, 1),
                       std=torch.ones(1, 3, 1, 1), peak_lr=0.1, steps_per_epoch=1, forward_chunks=2)
    batch = {"images": torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8), "lighting": torch.zeros(64, 3),
             "labels": torch.randint(0, 4, (64,))}
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    meter = Meter()
    for _ in range(3):
        loss, correct = train_step(state, batch, 0.1, cfg)
        meter.add_device(loss * 64, correct)
    assert reads == [] and isinstance(loss, torch.Tensor) and loss.dim() == 0
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    assert 0 < float(meter.totals[0]) / (3 * 64) < 5 and 0 <= float(meter.totals[1]) <= 3 * 64


@pytest.mark.unit
def test_select_device_stops_every_rank_with_the_same_line(monkeypatch):
    """8 ranks on a 4-GPU node: ranks 4-7 cannot have a GPU; every rank (the fine ones too) raises
    the same message after one gather, instead of the failing ranks leaving the others hung."""
    from types import SimpleNamespace

    from hvd_ba.train import devices

    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(devices.torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(devices.torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=f"GPU-{index}"))
    monkeypatch.setattr(devices.os, "environ", {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    monkeypatch.setattr(devices.socket, "gethostname", lambda: "n1")
    gathered = {}

    def run_rank(rank):
        monkeypatch.setattr(devices.dist, "local_rank", lambda: rank)
        monkeypatch.setattr(devices.dist, "rank", lambda: rank)
        monkeypatch.setattr(devices.dist, "allgather_object",
                            lambda obj, name: gathered.setdefault(rank, obj) and [gathered.get(r, ("n1", f"GPU-{r}", "cuda"))
                                                                                  for r in range(8)])
        with pytest.raises(DeviceError) as err:
            devices.select_device()
        return str(err.value)

    messages = {run_rank(r) for r in (5, 0)}  # a failing rank, then a fine one that sees rank 5's error
    assert len(messages) == 1
    assert messages.pop().startswith("rank 5 on host n1: local rank 5 but only 4 GPUs visible")
    # every rank has its GPU, but two share one: refused too
    monkeypatch.setattr(devices.dist, "local_rank", lambda: 0)
    monkeypatch.setattr(devices.dist, "allgather_object",
                        lambda obj, name: [("n1", "GPU-0", "cuda"), ("n1", "GPU-0", "cuda")])
    with pytest.raises(DeviceError, match="ranks 0, 1 on host n1 all use GPU GPU-0"):
        devices.select_device()
