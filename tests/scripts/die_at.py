"""Run a training script and kill -9 this process at a chosen point (for crash/resume tests).

    python tests/scripts/die_at.py --step K [--in-save] -- Pretrain.py --config ... --output_dir ...
    torchrun --nproc_per_node=2 tests/scripts/die_at.py --step K -- Pretrain.py ...     # every rank dies

``--step K``: SIGKILL right after global optimizer step K (before anything else happens).
``--in-save``: instead, SIGKILL in the middle of writing the first checkpoint after step K (half a file on disk).
"""
import argparse
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from engine import checkpoint as ckpt  # noqa: E402
from engine import trainer as trainer_mod  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--in-save", action="store_true")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    state = {"step": 0}
    original_step = trainer_mod.Trainer._step

    def step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        state["step"] = self.global_step
        if self.global_step == a.step and not a.in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    original_save = ckpt.torch.save

    def torn_save(obj, f, *args, **kwargs):
        if state["step"] >= a.step:
            original_save(obj, f, *args, **kwargs)
            f.flush()
            f.truncate(max(1, f.tell() // 2))  # half a file, then die inside the write
            os.kill(os.getpid(), signal.SIGKILL)
        return original_save(obj, f, *args, **kwargs)

    trainer_mod.Trainer._step = step
    if a.in_save:
        ckpt.torch.save = torn_save
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    sys.argv = [a.script, *args]
    os.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, a.script), run_name="__main__")


if __name__ == "__main__":
    main()
