"""Crash-proof runs: kill -9 at random steps (and inside a checkpoint write) then --resume ends bitwise equal to an
uninterrupted run, in one process and in two (gloo); SIGTERM / SIGUSR1 write a checkpoint and exit 75; resumes that
would silently change the run are refused; the divergence guard; the first-step gradient check.

Bitwise equality on the CPU needs one thread (``OMP_NUM_THREADS=1``): two threads differ by ~1e-5 even between two
uninterrupted runs.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import Pretrain
from engine import checkpoint as ckpt
from engine.resume import ResumeError, config_changes
from dataset.images import BadImageError
from engine.trainer import EXIT_PREEMPTED, Trainer, TrainOptions
from optim import OptimizerConfig, create_optimizer
from scheduler import SchedulerConfig, create_scheduler
from tests.conftest import ROOT, write_tiny_config
from tests.test_distributed import _free_port

EVERY = 3  # checkpoint_every_steps in these runs: at most EVERY steps may be lost
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _config(path, world, **extra):
    return write_tiny_config(path, world, checkpoint_every_steps=EVERY, test_file=None, print_freq=1, **extra)


def _in_process(config, out, *extra):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Pretrain.main(["--config", config, "--output_dir", str(out), "--device", "cpu", *extra])
    finally:
        torch.set_num_threads(threads)


def _die(config, out, step, *extra, in_save=False, nproc=1):
    """Run Pretrain.py that kills itself (every rank) with SIGKILL after global step ``step``."""
    driver = [os.path.join("tests", "scripts", "die_at.py"), "--step", str(step)] + (["--in-save"] if in_save else [])
    script = ["--", "Pretrain.py", "--config", config, "--output_dir", str(out), "--device", "cpu", *extra]
    if nproc == 1:
        cmd = [sys.executable, *driver, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *driver, *script]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, "the process was meant to die: " + res.stdout[-2000:]
    return res


def _run(config, out, *extra, nproc=1):
    cmd = ["Pretrain.py", "--config", config, "--output_dir", str(out), "--device", "cpu", *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *cmd]
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _step_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def _assert_same_weights(a_path, b_path):
    a = torch.load(a_path, map_location="cpu", weights_only=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True)
    assert a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


def _losses(out):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("train_loss")}
            for line in (out / "log.txt").read_text().splitlines() if '"epoch"' in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_world):
    """An uninterrupted 2-epoch run (8 steps per epoch, checkpoint_last.pth every 3 steps), one thread."""
    d = tmp_path_factory.mktemp("ref")
    config = _config(d / "tiny.yaml", tiny_world)
    _in_process(config, d / "out")
    return config, d / "out"


@pytest.mark.slow
def test_kill9_mid_epoch_and_in_checkpoint_write_then_resume_is_bitwise_equal(reference, tmp_path):
    config, ref = reference
    out = tmp_path / "out"
    lost = []
    # kill at step 5 (epoch 0), at step 11 after resuming mid-epoch 0 (epoch 1), then inside the write of the
    # checkpoint after step 13 (half a file on disk), then run to the end
    for step, extra in ((5, ()), (11, ("--resume",)), (13, ("--resume",))):
        _die(config, out, step, *extra, in_save=step == 13)
        latest = ckpt.latest_checkpoint(str(out))
        assert latest is not None
        lost.append(step - _step_of(latest))
    assert lost[0] <= EVERY and lost[1] <= EVERY  # at most checkpoint_every_steps of work lost to a kill -9
    assert os.path.exists(out / "checkpoint_last.pth.tmp")  # the torn write never replaced the good checkpoint
    assert _step_of(out / "checkpoint_last.pth") == 12
    _in_process(config, out, "--resume")
    _assert_same_weights(ref / "checkpoint_01.pth", out / "checkpoint_01.pth")
    assert _losses(out) == _losses(ref)  # epoch means restored exactly across mid-epoch resumes


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_writes_checkpoint_exits_75_and_resumes_exactly(reference, tmp_path, sig):
    config, ref = reference
    out = tmp_path / "out"
    cmd = [sys.executable, "Pretrain.py", "--config", config, "--output_dir", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Train Epoch: [0] [4/8]" in line:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert "stop signal: checkpoint written" in log
    state = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and 4 <= state["position"]["step_in_epoch"] < 8
    _in_process(config, out, "--resume")
    _assert_same_weights(ref / "checkpoint_01.pth", out / "checkpoint_01.pth")


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, tiny_world):
    """The uninterrupted run under 2 gloo processes (2 ranks x batch 4: 8 steps per epoch)."""
    d = tmp_path_factory.mktemp("ref2")
    config = _config(d / "tiny.yaml", tiny_world, batch_size=4)
    _run(config, d / "out", nproc=2)
    return config, d / "out"


@pytest.mark.slow
def test_kill9_and_resume_under_two_processes_is_bitwise_equal(reference2, tmp_path):
    config, ref = reference2
    out = tmp_path / "out"
    _die(config, out, 5, nproc=2)
    assert 5 - _step_of(ckpt.latest_checkpoint(str(out))) <= EVERY
    _die(config, out, 10, "--resume", in_save=True, nproc=2)  # resumed from step 3, torn write at step 12
    assert _step_of(ckpt.latest_checkpoint(str(out))) == 9
    res = _run(config, out, "--resume", nproc=2)
    assert "resumed from" in res.stdout and "world size 2" in res.stdout
    _assert_same_weights(ref / "checkpoint_01.pth", out / "checkpoint_01.pth")
    state = torch.load(out / "checkpoint_01.pth", map_location="cpu", weights_only=True)
    assert len(state["rng_state"]) == 2 and torch.equal(*state["param_checksums"])
    assert _losses(out) == _losses(ref)  # every rank restores its own partial epoch sums (rank 0's were counted twice)


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_every_rank_and_resumes_exactly(reference2, tmp_path):
    config, ref = reference2
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "Pretrain.py", "--config", config, "--output_dir", str(out), "--device",
           "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Train Epoch: [0] [3/8]" in line:
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
            break
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert "stop signal: checkpoint written" in log, log[-3000:]
    state = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert 3 <= state["position"]["step_in_epoch"] < 8 and len(state["rng_state"]) == 2
    assert len(state["position"]["ranks"]) == 2
    _run(config, out, "--resume", nproc=2)
    _assert_same_weights(ref / "checkpoint_01.pth", out / "checkpoint_01.pth")
    assert _losses(out) == _losses(ref)


# ----------------------------------------------------------------------------------------- resume that never lies
@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, tiny_world):
    d = tmp_path_factory.mktemp("one")
    config = write_tiny_config(d / "tiny.yaml", tiny_world, test_file=None)
    _in_process(config, d / "out", "--exit_after_epochs", "1")
    return config, d / "out"


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resume_with_changed_settings_is_refused_with_the_list(one_epoch, tmp_path):
    config, src = one_epoch
    out = _copy_run(src, tmp_path / "out")
    with pytest.raises(ResumeError) as e:
        _in_process(config, out, "--resume", "--options", "optimizer.lr=2e-4", "batch_size=4")
    msg = str(e.value)
    assert "optimizer.lr: 0.0003 -> 0.0002" in msg and "batch_size: 8 -> 4" in msg and "--resume_changes apply" in msg
    with pytest.raises(ResumeError, match="run.seed: 42 -> 7"):
        _in_process(config, out, "--resume", "--seed", "7")
    # harmless keys may change freely
    _in_process(config, out, "--resume", "--options", "print_freq=2", "num_workers=0", "--exit_after_epochs", "1")


def test_resume_changes_apply_takes_effect(one_epoch, tmp_path):
    config, src = one_epoch
    out = _copy_run(src, tmp_path / "out")
    _in_process(config, out, "--resume", "--resume_changes", "apply", "--options", "optimizer.lr=1e-3",
                "schedular.epochs=3", "schedular.min_lr=1e-3", "batch_size=4")
    state = torch.load(out / "checkpoint_02.pth", map_location="cpu", weights_only=True)
    assert state["config"]["optimizer"]["lr"] == 1e-3 and state["config"]["batch_size"] == 4
    # the schedule was rebuilt for the new values: cosine from 1e-3 to min_lr 1e-3 is flat at 1e-3
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert lines[-1]["epoch"] == 2 and lines[-1]["train_lr"] == pytest.approx(1e-3)
    assert any("resume_changes" in x for x in lines)
    assert state["step"] == 3 * 16  # re-based on the new geometry (3 epochs of 16 steps), where the schedule is


def test_new_run_refuses_a_used_folder_unless_overwrite(one_epoch, tmp_path):
    config, src = one_epoch
    out = _copy_run(src, tmp_path / "out")
    before = (out / "config.yaml").read_bytes()
    with pytest.raises(ResumeError, match="already holds another run's checkpoints"):
        _in_process(config, out, "--options", "optimizer.lr=1e-4")
    assert (out / "config.yaml").read_bytes() == before  # a refused run leaves the folder as it was
    _in_process(config, out, "--overwrite", "--options", "schedular.epochs=1")
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0]  # the old run's log is gone, not mixed in


def test_resume_path_unreadable_names_the_path_and_the_error(tmp_path, monkeypatch):
    """One process: the path and the OS error. Several ranks: also each failing rank and its host."""
    import engine.resume as resume

    missing = str(tmp_path / "nowhere" / "checkpoint_03.pth")
    with pytest.raises(ResumeError, match=r"cannot resume from .*nowhere/checkpoint_03.pth: \[Errno 2\] No such file"):
        resume.resolve_resume_path(missing, str(tmp_path))
    monkeypatch.setattr(resume.du, "all_gather_object", lambda obj: [obj, (False, "node7", 1, "no such file")])
    with pytest.raises(ResumeError, match=r"not readable by every rank \(.*rank 1 on host node7: no such file\)"):
        resume.resolve_resume_path(missing, str(tmp_path))


def test_queue_must_be_a_multiple_of_the_global_batch(tmp_path, tiny_world):
    from utils.config import ConfigError

    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, batch_size=6, test_file=None)
    with pytest.raises(ConfigError, match="queue_size 64 is not a multiple of the global batch size 6"):
        _in_process(config, tmp_path / "out")


def test_config_changes_ignores_bookkeeping_keys():
    old = {"optimizer": {"lr": 1e-4}, "print_freq": 50, "num_workers": 4, "batch_size": 64, "test_file": "a",
           "persistent_workers": True, "prefetch_factor": 2}
    new = {"optimizer": {"lr": 1e-4}, "print_freq": 10, "num_workers": 8, "batch_size": 32, "test_file": "b",
           "persistent_workers": False, "prefetch_factor": 4}
    assert config_changes(old, new) == [("batch_size", 64, 32)]


def test_evaluation_keys_and_file_spellings_are_no_changes():
    old = {"train_file": ["a.json"], "test_world": "w", "examples": 0, "gradcam_mode": "itm", "lr": 1}
    new = {"train_file": "a.json", "test_world": None, "examples": 6, "gradcam_mode": "itc", "lr": 1.0}
    assert config_changes(old, new) == []
    assert config_changes({"train_file": ["a.json", "b.json"]}, {"train_file": "a.json"}) == [
        ("train_file", ["a.json", "b.json"], "a.json")]


def test_keys_a_checkpoint_predates_count_as_their_defaults():
    from Pretrain import PretrainConfig
    from utils.config import defaults_of

    old = {"batch_size": 8}  # written before accum_steps existed
    defaults = defaults_of(PretrainConfig)
    assert config_changes(old, {"batch_size": 8, "accum_steps": 1}, defaults=defaults) == []
    assert config_changes(old, {"batch_size": 8, "accum_steps": 2}, defaults=defaults) == [("accum_steps", 1, 2)]


def test_unreadable_checkpoints_are_passed_over_or_named(one_epoch, tmp_path):
    config, src = one_epoch
    out = _copy_run(src, tmp_path / "out")
    good = out / "checkpoint_00.pth"
    data = good.read_bytes()
    (out / "checkpoint_last.pth").write_bytes(data[: len(data) // 2])  # torn outside atomic_save
    assert ckpt.latest_checkpoint(str(out)) == str(good)
    (out / "junk.pth").write_bytes(os.urandom(4000))
    for bad in (out / "checkpoint_last.pth", out / "junk.pth"):
        with pytest.raises(ResumeError, match=f"{bad.name} is not a readable checkpoint"):
            _in_process(config, out, "--resume", str(bad))


def test_a_failed_checkpoint_write_ends_the_run_in_one_line_and_leaves_no_temporary_file(tmp_path, tiny_world):
    """A full disk (here: a file-size limit, so writes fail with EFBIG as they would with ENOSPC) while writing a
    checkpoint: one line naming the file and the OS's reason (torch.save hides it in a RuntimeError about zip
    offsets), exit 2, no torn .tmp left on the full disk."""
    import resource

    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None, checkpoint_every_steps=2)
    limit = 256 * 1024  # far below a checkpoint, far above config.yaml and log.txt

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes raise EFBIG

    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "Pretrain.py", "--config", config, "--output_dir", str(out), "--device",
                          "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180,
                         preexec_fn=small_files)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"checkpoint write error: writing {out / 'checkpoint_last.pth'} failed: [Errno 27] File "
                           "too large"), res.stderr[-2000:]
    assert "continue with --resume" in last
    assert not list(out.glob("*.tmp")) and not list(out.glob("checkpoint_*.pth"))


def test_resume_takes_the_checkpoint_written_last_not_the_most_steps(tmp_path):
    """After a rollback (--resume checkpoint_00.pth with changes) or a change of world size, the abandoned branch's
    files may count more steps than the new branch's: --resume takes the one written last (save sequence number);
    files that predate the number are ordered by step as before; only unreadable files: an error, not a fresh start."""
    def write(name, step, seq=None):
        torch.save({"step": step, **({} if seq is None else {"save_seq": seq})}, tmp_path / name)

    write("checkpoint_00.pth", 10, 1)
    write("checkpoint_01.pth", 20, 2)
    write("checkpoint_02.pth", 30, 3)
    write("checkpoint_last.pth", 15, 4)  # the rolled-back branch, inside its epoch 1
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_last.pth")
    assert ckpt.last_save_seq(str(tmp_path)) == 4
    write("checkpoint_01.pth", 20, 5)  # the new branch ends its epoch 1
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_01.pth")
    for name in ("checkpoint_00.pth", "checkpoint_01.pth", "checkpoint_02.pth", "checkpoint_last.pth"):
        write(name, {"checkpoint_00.pth": 10, "checkpoint_01.pth": 20, "checkpoint_02.pth": 20}.get(name, 15))
    assert ckpt.last_save_seq(str(tmp_path)) == 0  # written before the sequence number: by step, epoch on a tie
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_02.pth")
    write("checkpoint_last.pth", 12, 1)  # a resumed legacy run writes the first numbered checkpoint
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_last.pth")
    for p in tmp_path.glob("checkpoint_*.pth"):
        p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(ResumeError, match="no readable checkpoint in .*: checkpoint_00.pth, .* are all truncated"):
        ckpt.latest_checkpoint(str(tmp_path))
    for p in tmp_path.glob("checkpoint_*.pth"):
        p.unlink()
    assert ckpt.latest_checkpoint(str(tmp_path)) is None  # nothing yet: a requeued first job starts from scratch


def test_only_unreadable_checkpoints_stop_every_rank_in_one_line(one_epoch, tmp_path):
    """Rank 0 finds that no checkpoint is readable: every rank stops with the message (exit 2), none waits in the
    broadcast for a path that never comes."""
    config, src = one_epoch
    out = _copy_run(src, tmp_path / "out")
    for p in out.glob("checkpoint_*.pth"):
        p.write_bytes(p.read_bytes()[:1000])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "Pretrain.py", "--config", config, "--output_dir", str(out), "--device",
           "cpu", "--resume"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("resume error: no readable checkpoint")]
    assert len(errors) == 2, res.stderr[-3000:]  # both ranks, each in one line


def test_checkpoints_are_numbered_in_the_order_written(one_epoch, tmp_path):
    config, src = one_epoch
    out = _copy_run(src, tmp_path / "out")
    seq = torch.load(out / "checkpoint_00.pth", weights_only=True, mmap=True)["save_seq"]
    assert seq >= 1
    _in_process(config, out, "--resume", str(out / "checkpoint_00.pth"), "--resume_changes", "apply",
                "--options", "schedular.epochs=2", "optimizer.lr=2e-4")
    assert torch.load(out / "checkpoint_01.pth", weights_only=True, mmap=True)["save_seq"] == seq + 1


def test_resume_refuses_checkpoints_without_the_training_state(one_epoch, tmp_path):
    """The original ALBEF's checkpoints and weights-only files name what they lack and the --checkpoint alternative
    (they used to end in a KeyError on 'rng_state'); so does the original's `--checkpoint X --resume True` idiom."""
    config, src = one_epoch
    state = torch.load(src / "checkpoint_00.pth", map_location="cpu", weights_only=True)
    original = {k: state[k] for k in ("model", "optimizer", "lr_scheduler", "config", "epoch")}
    torch.save(original, tmp_path / "albef_original.pth")
    torch.save({k: state[k] for k in ("model", "config", "epoch")}, tmp_path / "best.pth")
    torch.save([1, 2], tmp_path / "alist.pth")
    for name, lacks in (("albef_original.pth", "scaler, step, rng_state"),
                        ("best.pth", "optimizer, lr_scheduler, scaler, step, rng_state")):
        path = tmp_path / name
        with pytest.raises(ResumeError, match=rf"{name} cannot be resumed exactly: it lacks {lacks} .*"
                                              rf"--checkpoint {re.escape(str(path))} without --resume"):
            _in_process(config, tmp_path / ("out_" + name), "--resume", str(path))
    with pytest.raises(ResumeError, match="albef_original.pth cannot be resumed exactly"):
        _in_process(config, tmp_path / "out_idiom", "--checkpoint", str(tmp_path / "albef_original.pth"),
                    "--resume", "True")
    with pytest.raises(ResumeError, match="alist.pth is not a training checkpoint of this framework"):
        _in_process(config, tmp_path / "out_list", "--resume", str(tmp_path / "alist.pth"))


def test_checkpoint_flag_messages(tmp_path, tiny_world, one_epoch):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None)
    with pytest.raises(FileNotFoundError, match="checkpoint file .*nope.pth does not exist"):
        _in_process(config, tmp_path / "a", "--checkpoint", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(os.urandom(4000))
    with pytest.raises(ValueError, match="junk.pth: not a readable PyTorch checkpoint"):
        _in_process(config, tmp_path / "b", "--checkpoint", str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match=r"image_queue has shape \(32, 64\).*\(set embed_dim: 32, the checkpoint.s\)"):
        _in_process(config, tmp_path / "c", "--checkpoint", str(one_epoch[1] / "checkpoint_00.pth"),
                    "--options", "embed_dim=64")


@pytest.mark.parametrize("caption", ["", "   ", ["", "a dog"], []])
def test_empty_captions_are_skipped_or_record_errors(tmp_path, tiny_world, caption, caplog):
    """Pre-training (on_bad_image: skip) skips records without a non-empty caption and drops empty ones from lists
    (web-scale caption files have a few; the original trained on them as empty texts), saying so once; with
    on_bad_image: raise they are record errors. A caption of the wrong type is an error either way."""
    from dataset.caption_dataset import DataError, PretrainDataset

    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.jpg", "caption": "fine"},
                                                 {"image": "y.jpg", "caption": caption}]))
    with pytest.raises(DataError, match=r"a.json: record 1: caption must be a non-empty string"):
        PretrainDataset(str(tmp_path / "a.json"), None, on_bad_image="raise")
    ds = PretrainDataset(str(tmp_path / "a.json"), None)
    if caption == ["", "a dog"]:
        assert [r["caption"] for r in ds.records] == ["fine", ["a dog"]] and not caplog.records
    else:
        assert [r["caption"] for r in ds.records] == ["fine"]
        assert "a.json: 1 record(s) without a non-empty caption skipped (records 1)" in caplog.text
    (tmp_path / "b.json").write_text(json.dumps([{"image": "x.jpg", "caption": 5}]))
    with pytest.raises(DataError, match=r"b.json: record 0: caption must be a string or a list of strings"):
        PretrainDataset(str(tmp_path / "b.json"), None)


def test_retrieval_test_images_need_captions(tmp_path):
    from dataset.caption_dataset import DataError, RetrievalEvalDataset

    (tmp_path / "t.json").write_text(json.dumps([{"image": "x.jpg", "caption": ["a"]},
                                                 {"image": "y.jpg", "caption": []}]))
    with pytest.raises(DataError, match=r"t.json: record 1: caption must be a string or a non-empty list"):
        RetrievalEvalDataset(str(tmp_path / "t.json"), None)


def test_a_malformed_record_ends_the_script_with_one_line(tmp_path, tiny_world):
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.jpg", "caption": "fine"}, {"image": "y.jpg"}]))
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None,
                               train_file=[str(tmp_path / "a.json")])
    res = subprocess.run([sys.executable, "Pretrain.py", "--config", config, "--output_dir", str(tmp_path / "out"),
                          "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        f"data error: {tmp_path / 'a.json'}: record 1 lacks key(s) ['caption']: " + '{"image": "y.jpg"}']


def test_mostly_unreadable_images_stop_the_run_naming_image_root(tmp_path, tiny_world):
    records = json.loads((tiny_world / "pretrain.json").read_text())
    records = [dict(r, image=str(tiny_world / r["image"]) if i % 8 == 0 else "missing/" + r["image"])
               for i, r in enumerate(records)]
    (tmp_path / "pre.json").write_text(json.dumps(records))
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None, print_freq=1,
                               train_file=[str(tmp_path / "pre.json")])
    with pytest.raises(RuntimeError, match="images read so far this epoch were unreadable.*Check image_root"):
        _in_process(config, tmp_path / "out")


def test_a_missing_annotation_file_is_named_before_the_model_is_built(tmp_path, tiny_world):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None,
                               train_file=[str(tiny_world / "pretrain.json"), str(tmp_path / "cc12m.json")])
    res = subprocess.run([sys.executable, "Pretrain.py", "--config", config, "--output_dir", str(tmp_path / "out"),
                          "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        f"missing file: annotation file {tmp_path / 'cc12m.json'} does not exist (config key train_file)"]
    assert "model:" not in res.stdout


def test_a_wrong_image_root_stops_the_run_at_start_up_in_one_line(tmp_path, tiny_world):
    """Relative image paths against the wrong folder (the original resolved them against the working directory): no
    sampled image exists, so the run stops before training, naming a path and image_root (it used to let every
    loader worker try every record, then raise a RuntimeError from inside the worker)."""
    records = json.loads((tiny_world / "pretrain.json").read_text())
    (tmp_path / "pre.json").write_text(json.dumps(records))  # paths relative to the world, file elsewhere
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None,
                               train_file=[str(tmp_path / "pre.json")])
    res = subprocess.run([sys.executable, "Pretrain.py", "--config", config, "--output_dir", str(tmp_path / "out"),
                          "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("missing file: none of the images of 64 records spread over the "
                                               f"training data exists (e.g. {tmp_path / records[0]['image']})")
    assert "Check image_root" in err[0] and not (tmp_path / "out" / "checkpoint_00.pth").exists()


def test_training_that_ends_in_a_streak_of_skipped_steps_fails(tmp_path, tiny_world):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None)
    with pytest.raises(FloatingPointError, match="training ended inside a streak"):
        _in_process(config, tmp_path / "out", "--options", "optimizer.lr=1e30", "schedular.warmup_lr=1e30",
                    "schedular.epochs=1")
    assert not list((tmp_path / "out").glob("checkpoint_*.pth"))


# ----------------------------------------------------------------------------------------------- divergence guard
class _Toy(nn.Module):
    def __init__(self, unused=False):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        if unused:
            self.spare = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return {"loss": self.lin(x).pow(2).mean()}


def _toy_trainer(tmp_path, model, fused=None, **opts):
    opt = create_optimizer(model, OptimizerConfig(lr=0.1, fused=fused))
    sched = create_scheduler(SchedulerConfig(epochs=1, warmup_epochs=0, min_lr=0.1, warmup_lr=0.1), opt, 6)
    return Trainer(model, opt, sched, TrainOptions(num_workers=0, print_freq=100, **opts), str(tmp_path), {},
                   torch.device("cpu"), steps_per_epoch=6, batch_size=2)


@pytest.mark.parametrize("fused", [False, True])  # fused: the skip goes to the kernel as found_inf, no host sync
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, fused):
    model = _Toy()
    trainer = _toy_trainer(tmp_path, model, fused=fused, max_bad_steps=3)
    x = torch.ones(2, 4)
    batches = [{"image": x}, {"image": x * float("nan")}, {"image": x}, {"image": x * float("inf")},
               {"image": x * float("nan")}, {"image": x}]
    weights = []

    def step(module, batch, ctx):
        weights.append(module.lin.weight.detach().clone())
        return module(batch["image"])

    stats = trainer.train_epoch(batches, 0, step, lambda b: 2)
    assert stats["train_bad_steps"] == 3 and trainer.consecutive_bad == 0
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[3], weights[5])  # no update on a bad step
    assert not torch.equal(weights[0], weights[1])  # good steps do update
    assert torch.isfinite(torch.tensor(stats["train_loss"]))  # skipped steps stay out of the epoch mean
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .*epoch 0 step 3 .*loss=nan"):
        trainer.train_epoch([{"image": x * float("nan")}] * 6, 0, step, lambda b: 2)
    assert not list(tmp_path.glob("checkpoint_*"))


def test_no_checkpoint_with_non_finite_weights(tmp_path):
    model = _Toy()
    trainer = _toy_trainer(tmp_path, model)
    with torch.no_grad():
        model.lin.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write a checkpoint .*lin.weight"):
        trainer.save(0)
    assert not list(tmp_path.glob("checkpoint_*"))


def test_exploding_learning_rate_stops_with_the_engine_message(tmp_path, tiny_world):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None, max_bad_steps=3,
                               checkpoint_every_steps=1)
    with pytest.raises(FloatingPointError, match="training diverged: 3 consecutive steps"):
        _in_process(config, tmp_path / "out", "--options", "optimizer.lr=1e30", "schedular.warmup_lr=1e30")
    for path in tmp_path.glob("out/checkpoint_*.pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_first_step_names_parameters_without_gradient(tmp_path):
    trainer = _toy_trainer(tmp_path, _Toy(unused=True))
    with pytest.raises(RuntimeError, match=r"received no gradient in the first step: \['spare'\]"):
        trainer.train_epoch([{"image": torch.ones(2, 4)}], 0, lambda m, b, c: m(b["image"]), lambda b: 2)


def test_skipped_images_are_totalled_in_log_and_progress(tmp_path, tiny_world, capsys):
    """A truncated JPEG with on_bad_image: skip is replaced, counted once per epoch on all ranks and named."""
    records = json.loads((tiny_world / "pretrain.json").read_text())
    good = tiny_world / records[5]["image"]
    torn = tmp_path / "torn.jpg"
    data = good.read_bytes()
    torn.write_bytes(data[: len(data) * 6 // 10])
    records = [dict(r, image=str(tiny_world / r["image"])) for r in records]
    records[5]["image"] = str(torn)
    (tmp_path / "pre.json").write_text(json.dumps(records))
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None, print_freq=1,
                               train_file=[str(tmp_path / "pre.json")])
    _in_process(config, tmp_path / "out")
    lines = [json.loads(x) for x in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [x["train_bad_images"] for x in lines] == [1, 1]  # each record is drawn once per epoch
    assert lines[0]["train_bad_image_paths"] == [str(torn)]
    out = capsys.readouterr().out
    assert "bad images: 1 (this rank)" in out and "1 unreadable image(s) skipped on all ranks" in out


def test_checkpoint_every_minutes_writes_checkpoint_last(tmp_path, tiny_world, capsys):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None, checkpoint_every_minutes=1e-9)
    _in_process(config, tmp_path / "out", "--options", "schedular.epochs=1")
    state = torch.load(tmp_path / "out" / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert state["position"]["step_in_epoch"] == 7  # the last one inside the epoch (step 8 ends it)
    assert capsys.readouterr().out.count("saved ") == 7 + 1


# ----------------------------------------------------------------------------------- accumulation and data wait
def test_gradient_accumulation_sums_micro_batch_gradients(tmp_path):
    """For a loss that is a mean over samples, 2 micro-batches of 4 give the step of one batch of 8."""
    torch.manual_seed(0)
    a, b = _Toy(), _Toy()
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    one = _toy_trainer(tmp_path / "a", a)
    two = _toy_trainer(tmp_path / "b", b, accum_steps=2)
    two.steps_per_epoch = 1
    one.steps_per_epoch = 1
    step = lambda m, batch, c: m(batch["image"])  # noqa: E731
    one.train_epoch([{"image": x}], 0, step, lambda batch: 8)
    stats = two.train_epoch([{"image": x[:4]}, {"image": x[4:]}], 0, step, lambda batch: 4)
    torch.testing.assert_close(a.lin.weight, b.lin.weight, rtol=1e-6, atol=1e-7)
    assert two.global_step == 1 and "train_data_wait_pct" in stats


def test_accumulation_and_data_wait_in_a_pretraining_run(tmp_path, tiny_world, capsys):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None, print_freq=2, batch_size=4,
                               accum_steps=2)
    _in_process(config, tmp_path / "out", "--options", "schedular.epochs=1")
    out = capsys.readouterr().out
    assert "8 steps per epoch per rank, batch 4 per rank x 2 micro-batches, 8 per optimizer step" in out
    assert "data: " in out and "s/it (" in out
    state = torch.load(tmp_path / "out" / "checkpoint_00.pth", map_location="cpu", weights_only=True)
    assert state["step"] == 8 and int(state["model"]["queue_ptr"]) == (16 * 4) % 64  # one enqueue per micro-batch
    line = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[0])
    assert 0 <= line["train_data_wait_pct"] <= 100


# ------------------------------------------------------------------------------------------------- shards
@pytest.mark.slow
def test_pretraining_on_shards_resumes_exactly(tmp_path, tiny_world):
    from tools.make_shards import make_shards

    make_shards([str(tiny_world / "pretrain.json")], str(tmp_path / "shards" / "pt-%06d.tar"), samples_per_shard=16)
    pattern = str(tmp_path / "shards" / "pt-{000000..000003}.tar")
    config = _config(tmp_path / "tiny.yaml", tiny_world, train_file=[], train_shards=pattern,
                     train_samples_per_epoch=64, num_workers=0)
    ref, out = tmp_path / "ref", tmp_path / "out"
    _in_process(config, ref)
    assert "64 samples per epoch streamed" in _run(config, tmp_path / "probe", "--options",
                                                     "schedular.epochs=1").stdout
    _die(config, out, 5)
    _in_process(config, out, "--resume")
    _assert_same_weights(ref / "checkpoint_01.pth", out / "checkpoint_01.pth")


# ----------------------------------------------------------------------------------- evaluation sets and failures
def _test_file_with(tmp_path, tiny_world, image):
    """The tiny world's test file with record 1's image replaced by ``image`` (absolute)."""
    records = json.loads((tiny_world / "retrieval_test.json").read_text())
    records = [dict(r, image=str(tiny_world / r["image"])) for r in records]
    records[1]["image"] = str(image)
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_missing_evaluation_image_stops_the_run_at_start_up(tmp_path, tiny_world):
    test_file = _test_file_with(tmp_path, tiny_world, tmp_path / "gone.jpg")
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=test_file)
    with pytest.raises(FileNotFoundError, match=r"1 of the 16 images do not exist \(annotation file .*test.json.*"
                                                r"record 1: .*gone.jpg"):
        _in_process(config, tmp_path / "out", "--options", "schedular.epochs=1")
    assert not list((tmp_path / "out").glob("checkpoint_*.pth"))  # nothing trained: it failed before the epoch


def test_failed_evaluation_keeps_the_epochs_checkpoint(tmp_path, tiny_world):
    """An image that exists but cannot be decoded fails the evaluation after epoch 0: the epoch's checkpoint is
    written anyway (single process) with its training line in log.txt, and --resume continues with epoch 1."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    test_file = _test_file_with(tmp_path, tiny_world, broken)
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=test_file)
    with pytest.raises(BadImageError, match="broken.jpg"):
        _in_process(config, tmp_path / "out", "--options", "schedular.epochs=2")
    assert _step_of(tmp_path / "out" / "checkpoint_00.pth") > 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert lines[-1]["epoch"] == 0 and "broken.jpg" in lines[-1]["eval_error"] and "loss_itm" in str(lines[-1])
    shutil.copy(tiny_world / json.loads((tiny_world / "retrieval_test.json").read_text())[1]["image"], broken)
    _in_process(config, tmp_path / "out", "--resume", "--options", "schedular.epochs=2")
    assert (tmp_path / "out" / "checkpoint_01.pth").exists()
    assert json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[-1])["epoch"] == 1
