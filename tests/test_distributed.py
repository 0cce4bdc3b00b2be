"""Two CPU processes under torchrun (gloo): gradient sync, queue gathering, and a full Pretrain.py run."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_gradients_and_queue_are_synchronised():
    res = _torchrun([os.path.join("tests", "scripts", "ddp_step.py")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK rank=0" in res.stdout and "OK rank=1" in res.stdout


def test_global_hard_negatives_on_two_ranks():
    """itm_negatives: global: negatives drawn among both ranks' samples (padded texts), losses and DDP-averaged
    gradients equal to one process's computation over the whole batch (tests/scripts/global_negatives.py)."""
    res = _torchrun([os.path.join("tests", "scripts", "global_negatives.py")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK rank=0" in res.stdout and "OK rank=1" in res.stdout


@pytest.mark.slow
def test_pretrain_under_torchrun(tmp_path, tiny_config):
    out = tmp_path / "out"
    res = _torchrun(["Pretrain.py", "--config", tiny_config, "--output_dir", str(out), "--device", "cpu",
                     "--options", "schedular.epochs=1", "batch_size=4"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world size 2" in res.stdout
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["epoch"] == 0  # one log line, written by rank 0 only
    assert (out / "checkpoint_00.pth").exists()
    steps_per_rank = 64 // (2 * 4)
    assert f"{steps_per_rank} steps per epoch per rank" in res.stdout


def test_global_hard_negatives_in_one_process_equal_local():
    """One process: itm_negatives: global is the local draw (same losses, bitwise)."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
    import global_negatives as gn

    image, ids, mask = gn.make_batch()
    out = {}
    for mode in ("local", "global"):
        model = gn.make_model()
        model.cfg.itm_negatives = mode
        out[mode] = model(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(3))
    for k in out["local"]:
        assert torch.equal(out["local"][k], out["global"][k]), k


def test_slurm_environment_decisions(capsys):
    """A plain `python Pretrain.py` inside an sbatch script sees the allocation's SLURM_NTASKS but no srun step
    (SLURM_STEP_NUM_TASKS): one process with a note, not a wait for ranks that never come. Under srun the port is
    the job's own (two jobs sharing a node), the address must be given."""
    from unittest import mock

    from utils import distributed as du

    before = dict(os.environ)
    with mock.patch.dict(os.environ):  # restores the environment whole, including what init_distributed exports
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS"):
            os.environ.pop(k, None)
        os.environ.update(SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_JOB_ID="1234567")
        info = du.init_distributed("cpu")
        assert not info.distributed and info.world_size == 1
        assert "SLURM_NTASKS=8 but this process was not started by srun" in capsys.readouterr().out
        os.environ["SLURM_STEP_NUM_TASKS"] = "2"  # under srun, 2 tasks
        with pytest.raises(RuntimeError, match="SLURM launch without MASTER_ADDR"):
            du.init_distributed("cpu")
        assert os.environ["MASTER_PORT"] == str(20000 + 1234567 % 20000)
    assert dict(os.environ) == before  # nothing leaks into the tests that follow
