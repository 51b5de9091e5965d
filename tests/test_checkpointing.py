"""Distributed checkpoints: exact resume, resharding on load, atomic publish (also of background
saves), the distributed optimizer's per-rank state, errors, SIGTERM and SIGUSR1.

Multi-process runs go through tests/harness/checkpoint_run.py under torchrun (gloo, fp32).
Runs that several tests need (a reference run that also saves at iteration 2) are shared.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.torchrun import ROOT, free_port, run_json

HARNESS = "tests/harness/checkpoint_run.py"


def harness(nproc, args, out):
    return run_json(HARNESS, nproc, [str(a) for a in args], str(out), timeout=600)


def assert_same_steps(got, expected, probes=True):
    """Bit-equal losses, grad norms, learning rates (and RNG draws) per iteration."""
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    for g, e in zip(got, expected):
        assert g["loss"] == e["loss"], (g["iteration"], g["loss"], e["loss"])
        assert g["grad_norm"] == e["grad_norm"], (g["iteration"], g["grad_norm"], e["grad_norm"])
        assert g["lr"] == e["lr"]
        if probes:
            assert g["probe"] == e["probe"], g["iteration"]


def assert_close_steps(got, expected, rel=1e-5):
    """Equal up to the reduction-order differences between layouts (as in test_layout_parity)."""
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    for g, e in zip(got, expected):
        for key in ("loss", "grad_norm", "lr"):
            assert abs(g[key] - e[key]) <= rel * max(abs(g[key]), abs(e[key])), (key, g, e)


def read_tensors(path):
    """Every tensor of a checkpoint directory as a global tensor, without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def assert_same_tensors(a, b, extra=None):
    ta, tb = read_tensors(a), read_tensors(b)
    assert set(ta) == set(tb)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in ta)
    assert any(k.startswith("decoder.layers.") for k in ta)
    if extra:
        assert any(k.startswith(extra + "decoder.layers.") for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ


# ------------------------------------------------------------------------------------------
# shared runs
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_ref(tmp_path_factory):
    """One process, 4 uninterrupted steps, saving at iteration 2 along the way."""
    d = tmp_path_factory.mktemp("single_ref")
    out = harness(1, ["--steps", 4, "--save", d / "ckpt", "--save-at", 2], d / "run.json")
    return out["records"], d / "ckpt"


@pytest.fixture(scope="module")
def dp2_ref(tmp_path_factory):
    """DP=2 with the distributed optimizer, 4 steps, saving at iteration 2 (synchronously);
    gathering the optimizer state onto one rank is an error."""
    d = tmp_path_factory.mktemp("dp2_ref")
    out = harness(2, ["--dist-opt", "--forbid-gather", "--steps", 4, "--save", d / "ckpt",
                      "--save-at", 2], d / "run.json")
    return out["records"], d / "ckpt"


@pytest.fixture(scope="module")
def tp2_ref(tmp_path_factory):
    """TP=2, 4 steps, saving at iteration 2."""
    d = tmp_path_factory.mktemp("tp2_ref")
    out = harness(2, ["--tp", 2, "--steps", 4, "--save", d / "ckpt", "--save-at", 2, "--teacher"],
                  d / "run.json")
    return out["records"], d / "ckpt"


# ------------------------------------------------------------------------------------------
# 1. resume equality
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_single_process_is_exact(single_ref, tmp_path):
    records, ckpt = single_ref
    assert (ckpt / "iter_0000002").is_dir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    out = harness(1, ["--steps", 4, "--load", ckpt], tmp_path / "resume.json")
    assert out["loaded"]["iteration"] == 2 and out["loaded"]["optimizer"] and out["loaded"]["rng"]
    assert out["loaded"]["state"]["consumed_samples"] == 16
    # losses, grad norms, lr and the draws of every restored generator match bit for bit
    assert_same_steps(out["records"], records[2:])


@pytest.mark.slow
def test_resume_pipeline_parallel_is_exact(tmp_path):
    flags = ["--pp", 2, "--loops", 2]
    ref = harness(2, [*flags, "--steps", 4, "--save", tmp_path / "ckpt", "--save-at", 2],
                  tmp_path / "ref.json")
    out = harness(2, [*flags, "--steps", 4, "--load", tmp_path / "ckpt"], tmp_path / "resume.json")
    assert out["loaded"]["rng"] and out["loaded"]["optimizer"]
    assert_same_steps(out["records"], ref["records"][2:])


# ------------------------------------------------------------------------------------------
# 2. reshard on load
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("nproc,flags", [(1, []), (2, ["--pp", 2])], ids=["tp2_to_single", "tp2_to_pp2"])
def test_reshard_plain_optimizer(tp2_ref, tmp_path, nproc, flags):
    records, ckpt = tp2_ref
    resaved = tmp_path / "resaved"
    out = harness(nproc, [*flags, "--steps", 4, "--load", ckpt, "--save-on-load", resaved,
                          "--teacher"], tmp_path / "run.json")
    assert out["loaded"]["layout"]["tp"] == 2
    assert out["loaded"]["extra_models"] == ["teacher"]
    assert out["loaded"]["optimizer"] and not out["loaded"]["rng"]  # RNG skipped: other layout
    # model weights, Adam moments and the extra model went through the new layout unchanged
    assert_same_tensors(ckpt / "iter_0000002", resaved / "iter_0000002", extra="teacher.")
    # and the continuation is the TP=2 run's (up to the layouts' reduction order)
    assert_close_steps(out["records"], records[2:])


@pytest.mark.slow
def test_reshard_distributed_optimizer_dp2_to_tp2(dp2_ref, tmp_path):
    records, ckpt = dp2_ref
    resaved = tmp_path / "resaved"
    out = harness(2, ["--dist-opt", "--forbid-gather", "--tp", 2, "--steps", 4, "--load", ckpt,
                      "--save-on-load", resaved], tmp_path / "run.json")
    assert out["loaded"]["layout"]["dp"] == 2 and out["loaded"]["optimizer"]
    assert_same_tensors(ckpt / "iter_0000002", resaved / "iter_0000002")
    assert_close_steps(out["records"], records[2:])


def _stored_by_file(path):
    """checkpoint file -> the top-level keys of the tensors stored in it."""
    from torch.distributed.checkpoint import FileSystemReader

    found = {}
    for index, info in FileSystemReader(str(path)).read_metadata().storage_data.items():
        found.setdefault(info.relative_path, set()).add(index.fqn.split(".")[0])
    return found


@pytest.mark.slow
def test_distributed_optimizer_is_written_per_rank_and_replicas_by_both(dp2_ref):
    """The DP=2 save ran with megatron-core's gather of the optimizer state forbidden (dp2_ref);
    the fully parallel save spread the model's replicated tensors over both DP ranks (torch_dist
    names each file after the rank that wrote it: __<rank>_<n>.distcp)."""
    _, ckpt = dp2_ref
    by_file = _stored_by_file(ckpt / "iter_0000002")
    writers = {name.split("_")[2] for name, keys in by_file.items() if "decoder" in keys}
    assert writers == {"0", "1"}, by_file
    assert {name.split("_")[2] for name, keys in by_file.items() if "optimizer" in keys} == {"0", "1"}


@pytest.mark.slow
def test_async_save_then_resume_is_exact(dp2_ref, tmp_path):
    records, sync_ckpt = dp2_ref
    # the background writer waits 3 s before writing: iteration 3 trains while it writes (a
    # synchronous save would have published iteration 2 before it)
    out = harness(2, ["--dist-opt", "--forbid-gather", "--steps", 4, "--save", tmp_path / "ckpt",
                      "--save-at", 2, "--async-save", "--writer-delay", 3], tmp_path / "async.json")
    assert [r["published"] for r in out["records"][:3]] == [None, None, None]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    # saving in the background changed neither the training nor what was saved
    assert_same_steps(out["records"], records)
    assert_same_tensors(sync_ckpt / "iter_0000002", tmp_path / "ckpt" / "iter_0000002")
    resumed = harness(2, ["--dist-opt", "--forbid-gather", "--measure-load", "--steps", 4,
                          "--load", tmp_path / "ckpt"], tmp_path / "resume.json")
    assert resumed["loaded"]["optimizer"] and resumed["loaded"]["rng"]
    assert_same_steps(resumed["records"], records[2:])
    # each DP rank asked the load for exactly its own shard of the optimizer state, half of it
    stored = sum(t.numel() for k, t in read_tensors(sync_ckpt / "iter_0000002").items()
                 if k.startswith("optimizer."))
    ranks = resumed["load_requests"]
    assert [r["requested"] for r in ranks] == [[r["owned"]] for r in ranks]
    assert sum(r["owned"] for r in ranks) == stored and max(r["owned"] for r in ranks) < 0.51 * stored


# ------------------------------------------------------------------------------------------
# 3. atomic save under kill -9
# ------------------------------------------------------------------------------------------
def _launch(nproc, args, out, launcher=()):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", *launcher, os.path.join(ROOT, HARNESS),
               *map(str, args), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended early (rc={proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(single_ref, tmp_path):
    from megatron_looprpt.training import checkpointing

    records, ref_ckpt = single_ref
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ref_ckpt, ckpt)
    marker = tmp_path / "pause_marker"
    pids = tmp_path / "pids"
    pids.mkdir()
    # resume from 2 and save at 4; the save stops after writing its shards, before publishing
    proc = _launch(1, ["--steps", 4, "--load", ckpt, "--save", ckpt, "--save-at", 4,
                       "--pause-in-save", 120, "--pid-dir", pids], tmp_path / "killed.json")
    try:
        _wait_for(marker.exists, proc)
        # torchrun starts its workers in their own sessions: kill -9 the worker itself
        worker = int((pids / "rank0.pid").read_text())
        os.kill(worker, signal.SIGKILL)
        _wait_for(lambda: not _alive(worker), proc=None, timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    temps = [p for p in os.listdir(ckpt) if p.startswith(".tmp_iter_0000004_")]
    assert len(temps) == 1 and os.listdir(ckpt / temps[0])  # half-published, with shards in it
    assert not (ckpt / "iter_0000004").exists()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert checkpointing.resolve_checkpoint(str(ckpt)) == (str(ckpt / "iter_0000002"), 2)
    assert checkpointing.list_iterations(str(ckpt)) == [2]
    # the previous checkpoint still resumes exactly; the next save cleans the temp dir up
    out = harness(1, ["--steps", 4, "--load", ckpt, "--save", ckpt, "--save-at", 4, "--keep", 1],
                  tmp_path / "resume.json")
    assert_same_steps(out["records"], records[2:])
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def _files(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.mark.slow
def test_kill_during_async_save_keeps_previous_checkpoint(single_ref, tmp_path):
    from megatron_looprpt.training import checkpointing

    _, ref_ckpt = single_ref
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ref_ckpt, ckpt)
    pids = tmp_path / "pids"
    pids.mkdir()
    # resume from 2, save at 3 in the background; the writer waits a minute before writing
    proc = _launch(1, ["--steps", 1000, "--step-sleep", 0.2, "--load", ckpt, "--save", ckpt,
                       "--save-at", 3, "--async-save", "--writer-delay", 60, "--pid-dir", pids],
                   tmp_path / "killed.json")
    try:
        _wait_for((pids / "writer0.pid").exists, proc)
        worker, writer = int((pids / "rank0.pid").read_text()), int((pids / "writer0.pid").read_text())
        # the node dies: the worker, its background writer and the writer's result queue
        os.killpg(worker, signal.SIGKILL)
        _wait_for(lambda: not _alive(worker) and not _alive(writer), proc=None, timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert any(p.startswith(".tmp_iter_0000003_") for p in os.listdir(ckpt))  # never published
    assert not (ckpt / "iter_0000003").exists()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert checkpointing.resolve_checkpoint(str(ckpt)) == (str(ckpt / "iter_0000002"), 2)
    # the checkpoint written before is there byte for byte
    assert _files(ckpt / "iter_0000002") == _files(ref_ckpt / "iter_0000002")


# ------------------------------------------------------------------------------------------
# 4. read_checkpoint_args and error messages
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_read_checkpoint_args_and_errors(single_ref, tmp_path):
    from megatron_looprpt.training.checkpointing import (
        CheckpointError, read_checkpoint_args, read_checkpoint_info)
    from megatron_looprpt.training.checkpointing.files import clean_stale

    _, ref_ckpt = single_ref
    args = read_checkpoint_args(str(ref_ckpt))
    assert args["model"]["num_layers"] == 4 and args["model"]["hidden_size"] == 64
    assert args["harness"]["steps"] == 4 and args["harness"]["save_at"] == [2]
    assert read_checkpoint_args(str(ref_ckpt / "iter_0000002")) == args  # a checkpoint dir itself
    info = read_checkpoint_info(str(ref_ckpt))
    assert info["iteration"] == 2 and info["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    assert info["state"] == {"consumed_samples": 16, "iteration": 2}
    # in a fresh interpreter: no process group, no model code
    probe = ("import json, sys, torch.distributed as dist;"
             "from megatron_looprpt.training.checkpointing import read_checkpoint_args;"
             "args = read_checkpoint_args(sys.argv[1]);"
             "assert not dist.is_initialized();"
             "assert not any(m.startswith('megatron_looprpt.models') for m in sys.modules);"
             "print(json.dumps(args))")
    result = subprocess.run([sys.executable, "-c", probe, str(ref_ckpt)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == args
    assert read_checkpoint_args(str(tmp_path / "nothing_here")) is None
    (tmp_path / "empty").mkdir()
    assert read_checkpoint_args(str(tmp_path / "empty")) is None

    def error(path):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint_args(str(path))
        message = str(info.value)
        assert "\n" not in message
        return message

    # the tracker points to a directory that is not there
    missing = tmp_path / "missing"
    shutil.copytree(ref_ckpt, missing)
    (missing / "latest_checkpointed_iteration.txt").write_text("7\n")
    message = error(missing)
    assert str(missing / "iter_0000007") in message and "iteration 2" in message

    # a corrupt tracker
    (missing / "latest_checkpointed_iteration.txt").write_text("garbage")
    assert str(missing / "latest_checkpointed_iteration.txt") in error(missing)

    # an incomplete directory (metadata.json is what megatron-core writes last)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(ref_ckpt, incomplete)
    shutil.copytree(incomplete / "iter_0000002", incomplete / "iter_0000003")
    os.remove(incomplete / "iter_0000003" / "metadata.json")
    (incomplete / "latest_checkpointed_iteration.txt").write_text("3")
    message = error(incomplete)
    assert str(incomplete / "iter_0000003") in message and "iteration 2" in message

    # a corrupt common state
    (incomplete / "iter_0000003" / "metadata.json").write_text(
        (incomplete / "iter_0000002" / "metadata.json").read_text())
    (incomplete / "iter_0000003" / "common.pt").write_bytes(b"not a torch file")
    message = error(incomplete)
    assert str(incomplete / "iter_0000003") in message and "iteration 2" in message

    # killed between moving iter_0000002 aside and renaming its re-save into place: the
    # aside copy is used, and the next save puts it back
    aside = tmp_path / "aside"
    shutil.copytree(ref_ckpt, aside)
    os.rename(aside / "iter_0000002", aside / ".old_iter_0000002_abc")
    assert read_checkpoint_info(str(aside))["path"] == str(aside / ".old_iter_0000002_abc")
    clean_stale(str(aside))
    assert sorted(os.listdir(aside)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]

    # without a tracker: the newest complete iter_* directory; temp dirs never count
    os.remove(incomplete / "latest_checkpointed_iteration.txt")
    shutil.rmtree(incomplete / "iter_0000003")
    shutil.copytree(incomplete / "iter_0000002", incomplete / ".tmp_iter_0000009_x")
    assert read_checkpoint_info(str(incomplete))["iteration"] == 2


@pytest.mark.slow
def test_load_errors_are_one_line(single_ref, tmp_path, single_process_parallel):
    """load_checkpoint in this process: a truncated shard names the checkpoint."""
    from megatron_looprpt.training.checkpointing import CheckpointError, load_checkpoint
    from tests.harness.checkpoint_run import build

    _, ref_ckpt = single_ref
    _, _, pm, optimizer, scheduler, _ = build()
    assert load_checkpoint(str(tmp_path / "none"), pm, optimizer, scheduler) is None
    loaded = load_checkpoint(str(ref_ckpt), pm, optimizer, scheduler, load_rng=False)
    assert loaded.iteration == 2 and loaded.optimizer_loaded and not loaded.rng_loaded
    assert scheduler.num_steps == 16
    # an extra model the checkpoint does not hold is left alone
    teacher = build()[2].model
    before = [p.detach().clone() for p in teacher.parameters()]
    loaded = load_checkpoint(str(ref_ckpt), pm, optimizer, scheduler, extra_models={"teacher": teacher})
    assert loaded.extra_models == []
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))

    # model only: the optimizer keeps its state (here: none yet)
    _, _, pm2, optimizer2, scheduler2, _ = build()
    loaded = load_checkpoint(str(ref_ckpt), pm2, optimizer2, scheduler2, load_optim=False)
    assert not loaded.optimizer_loaded
    assert scheduler2.num_steps == 0  # nor its schedule: --finetune starts the run's own
    assert all(torch.equal(a, b) for a, b in zip(pm.model.parameters(), pm2.model.parameters()))

    # a plain-optimizer checkpoint cannot fill a distributed optimizer, but its model can
    _, _, pm3, optimizer3, scheduler3, _ = build(dist_opt=True)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(ref_ckpt), pm3, optimizer3, scheduler3)
    assert "\n" not in str(info.value) and "load_optim=False" in str(info.value)
    assert load_checkpoint(str(ref_ckpt), pm3, optimizer3, scheduler3, load_optim=False).iteration == 2

    broken = tmp_path / "broken"
    shutil.copytree(ref_ckpt, broken)
    for name in os.listdir(broken / "iter_0000002"):
        if name.endswith(".distcp"):
            with open(broken / "iter_0000002" / name, "r+b") as f:
                f.truncate(100)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(broken), pm, optimizer, scheduler)
    assert "\n" not in str(info.value) and str(broken / "iter_0000002") in str(info.value)


# ------------------------------------------------------------------------------------------
# 5. SIGTERM, SIGUSR1
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_on_one_rank_saves_and_exits_cleanly(tmp_path):
    from megatron_looprpt.training.checkpointing import read_checkpoint_info

    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "run.json"
    proc = _launch(2, ["--pp", 2, "--steps", 1000, "--sigterm", "--step-sleep", 0.2,
                       "--pid-dir", pids, "--save", tmp_path / "ckpt"], out)
    try:
        _wait_for(lambda: len(os.listdir(pids)) == 2, proc)
        time.sleep(0.5)
        # only rank 1 gets the signal: received() must make both ranks stop together
        os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    except BaseException:
        for name in os.listdir(pids):
            try:
                os.kill(int((pids / name).read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["interrupted"] and 0 < result["end_iteration"] < 1000
    info = read_checkpoint_info(str(tmp_path / "ckpt"))
    assert info["iteration"] == result["end_iteration"]
    assert info["state"]["consumed_samples"] == 8 * result["end_iteration"]


@pytest.mark.slow
def test_sigusr1_forwarded_by_torchrun_saves_and_exits_cleanly(tmp_path):
    """SLURM's early warning (--signal=USR1@120) reaches torchrun; told to, torchrun forwards
    it to every worker, which save at the next iteration boundary and exit."""
    from megatron_looprpt.training.checkpointing import read_checkpoint_info

    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "run.json"
    proc = _launch(2, ["--pp", 2, "--steps", 1000, "--sigterm", "--step-sleep", 0.2,
                       "--pid-dir", pids, "--save", tmp_path / "ckpt"], out,
                   launcher=["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"])
    try:
        _wait_for(lambda: len(os.listdir(pids)) == 2, proc)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    except BaseException:
        for name in os.listdir(pids):
            try:
                os.kill(int((pids / name).read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    # torchrun itself reports the signal it got (non-zero); the workers finished their save
    assert "SIGUSR1" in stderr, stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["interrupted"] and result["signal"] == signal.SIGUSR1 and 0 < result["end_iteration"] < 1000
    info = read_checkpoint_info(str(tmp_path / "ckpt"))
    assert info["iteration"] == result["end_iteration"]
    assert info["state"]["consumed_samples"] == 8 * result["end_iteration"]


# ------------------------------------------------------------------------------------------
# 6. the distributed optimizer's boxes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 6, 5), (4, 1, 3)])
def test_boxes_cover_a_flat_range_exactly(shape):
    import math
    import random as pyrandom

    from megatron_looprpt.training.checkpointing.optimizer_state import _boxes

    numel = math.prod(shape)
    ranges = [(0, numel), (0, 1), (numel - 1, numel)]
    rng = pyrandom.Random(0)
    ranges += [tuple(sorted(rng.sample(range(numel + 1), 2))) for _ in range(30)]
    for start, stop in ranges:
        flat = torch.arange(numel).view(shape)
        covered = []
        boxes = _boxes(shape, start, stop)
        for offset, size in boxes:
            part = flat[tuple(slice(o, o + n) for o, n in zip(offset, size))]
            covered += part.reshape(-1).tolist()
        # in order, each box one contiguous run, at most two boxes per axis
        assert covered == list(range(start, stop)), (shape, start, stop, boxes)
        assert len(boxes) <= max(1, 2 * len(shape) - 1)
