"""The proof that 2 ranks equal 1: BA steps of Horovod and of torch.distributed against one
process that averages the per-rank losses itself, with ghost BN applied per rank and per group;
and exact evaluation."""
import json

import pytest
import torch

from hvd_ba.config import load_config
from hvd_ba.data.manifest import load_index
from hvd_ba.data.pipeline import make_train_loader
from hvd_ba.train.engine import lr_at, train_step
from helpers import (OTHER_SUMMATION, PROOF, assert_evaluation_equals_one_process, fresh_state, launch, run_reference,
                     torchrun)


@pytest.mark.integration
@pytest.mark.parametrize("steps, ghost_impl", [(1, "split"), (3, "split"), (3, "accumulate")])
def test_two_ranks_of_either_backend_equal_one_process(steps, ghost_impl, small_data, tmp_path):
    """Horovod's and DDP's averaged gradients each give the single-process reference's parameters,
    and each other's; and (3 steps, split) the Horovod run's last evaluation equals one process
    evaluating its model.pt."""
    settings = [*PROOF, f"run.max_steps_per_epoch={steps}", f"model.ghost_impl={ghost_impl}"]
    r = launch("gloo", small_data, tmp_path / "horovod", extra=settings)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = torchrun(small_data, tmp_path / "torch", settings)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 ranks on cpu (torch, gloo)" in r.stdout + r.stderr
    reference = run_reference(small_data, settings, tmp_path / "reference.pt")
    assert reference["steps"] == steps
    cfg = load_config("demo", [f"data.path={small_data}", "data.manifest_dir=null", *settings])
    initial = fresh_state(cfg, 4, 1, 2).model.state_dict()
    trained = {b: torch.load(tmp_path / b / "model.pt", weights_only=True) for b in ("horovod", "torch")}
    for backend, params in trained.items():
        for name, p in reference["params"].items():
            assert torch.allclose(params[name], p, atol=OTHER_SUMMATION, rtol=0), \
                (backend, name, float((params[name] - p).abs().max()))
        moved = sum(float((params[n] - initial[n]).abs().max()) > 1e-3 for n in reference["params"])
        assert moved > 10, backend  # the parameters really changed, so the equality above is not trivial
        ranks = [json.loads((tmp_path / backend / f"rank{i}.json").read_text()) for i in (0, 1)]
        assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"] and ranks[0]["steps"] == steps, backend
    for name in reference["params"]:
        assert torch.allclose(trained["torch"][name], trained["horovod"][name], atol=OTHER_SUMMATION, rtol=0), name
    if (steps, ghost_impl) == (3, "split"):  # exact evaluation: one process evaluating this run's model.pt
        assert_evaluation_equals_one_process(small_data, tmp_path / "horovod")


@pytest.mark.unit
def test_split_and_accumulate_ghost_bn_give_the_same_step(small_data):
    cfg = load_config("demo", [f"data.path={small_data}", "data.manifest_dir=null", *PROOF])
    index = load_index(small_data, "train", None)
    (batch,) = [b for _, b in zip(range(1), make_train_loader(index, cfg, 0, 1))]
    results = []
    for chunks in (1, 2):  # 32 samples: one split forward, or two forward/backward passes of 16
        state = fresh_state(cfg, 4, 10, 1)
        state.forward_chunks = chunks
        state.model.train()
        loss, correct = train_step(state, batch, 0.1, cfg)
        results.append((float(loss), int(correct), state.model.state_dict()))
    (l1, c1, s1), (l2, c2, s2) = results
    assert l1 == pytest.approx(l2, abs=1e-6) and c1 == c2
    for name in s1:
        assert torch.allclose(s1[name].float(), s2[name].float(), atol=1e-5), name


@pytest.mark.unit
def test_copies_do_not_change_lr_or_steps_per_epoch(small_data):
    index = load_index(small_data, "train", None)
    figures = {}
    for m in (1, 4):
        cfg = load_config("demo", [f"data.path={small_data}", f"data.copies={m}", "data.unique_batch=8",
                                   "model.ghost_size=8"])
        loader = make_train_loader(index, cfg, 0, 2)
        state = fresh_state(cfg, 4, len(loader), world=2)
        figures[m] = (len(loader), [lr_at(s, state, cfg.optim) for s in range(0, 200, 7)])
    assert figures[1] == figures[4]
    assert figures[1][0] == (4 * 48 // 2) // 8
