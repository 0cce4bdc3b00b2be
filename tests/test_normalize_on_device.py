"""``normalize_on_device``: the loader yields uint8 images and the engine normalises them on the device, to the
same floats bit for bit as normalising in the loader workers: unit level (every train transform, every pixel
value), Pretrain.py end to end on the JSON path and on shards (same losses and weights), a resume that switches
it, and every other training script (same losses)."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import Pretrain
from dataset.transforms import (AugmentConfig, eval_transform, grounding_train_transform, normalize_images,
                                train_transform, uint8_output)
from tests.conftest import write_tiny_config
from tests.test_classifiers_e2e import task_files  # noqa: F401  (fixture)
from tests.test_grounding_e2e import grounding_set  # noqa: F401  (fixture)
from tests.test_vqa_e2e import vqa_files  # noqa: F401  (fixture)

AUGMENT = {"crop_scale": [0.5, 1.0], "hflip": True, "randaugment": True}


def _photos(n=6):
    rng = np.random.default_rng(0)
    sizes = [(47, 33), (64, 64), (90, 41), (33, 70), (128, 96), (40, 40)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def _seeded(tf, images, seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
    out = [tf(im) for im in images]
    return out, torch.get_rng_state()


@pytest.mark.parametrize("make", [
    lambda: train_transform(32, AugmentConfig()),
    lambda: train_transform(48, AugmentConfig(randaugment_space="torchvision", randaugment_magnitude=20)),
    lambda: grounding_train_transform(32, AugmentConfig()),
    lambda: eval_transform(40),
])
def test_uint8_batch_normalised_later_equals_the_float_batch(make):
    tf = make()
    u8 = uint8_output(tf)
    assert len(u8.transforms) == len(tf.transforms) - 2
    images = _photos()
    floats, state_f = _seeded(tf, images)
    ints, state_u = _seeded(u8, images)
    assert torch.equal(state_f, state_u)  # the same random draws
    assert all(t.dtype == torch.uint8 for t in ints)
    batch = normalize_images(torch.stack(ints))  # as the trainer does after the copy to the device
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.stack(floats))


def test_every_pixel_value_of_every_channel():
    from torchvision.transforms import v2 as T

    image = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    to_float = T.Compose(train_transform(16, AugmentConfig()).transforms[-3:])  # ToImage, ToDtype, Normalize
    expected = to_float(Image.fromarray(image.permute(1, 2, 0).numpy()))
    got = normalize_images(torch.stack([image, image.flip(-1)]))
    assert torch.equal(got[0], expected) and torch.equal(got[1], expected.flip(-1))
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(got)
    # the mean / std tensors are made once per device (on CUDA, building them from Python lists at every step
    # would be a host sync per step)
    from dataset.transforms import _clip_constants

    assert all(a is b for a, b in zip(_clip_constants(got.device), _clip_constants(got.device)))


def test_other_transforms_are_refused():
    from torchvision.transforms import v2 as T

    with pytest.raises(ValueError, match="ToImage, ToDtype"):
        uint8_output(T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3)]))
    with pytest.raises(ValueError, match="ToImage, ToDtype"):
        uint8_output(T.PILToTensor())


def _counting(monkeypatch):
    import engine.trainer

    calls = []

    def wrapped(images):
        calls.append(images.dtype)
        return normalize_images(images)

    monkeypatch.setattr(engine.trainer, "normalize_images", wrapped)
    return calls


def _run(config, out, flag, *extra):
    Pretrain.main(["--config", config, "--output_dir", str(out), "--device", "cpu", *extra,
                   "--options", f"normalize_on_device={flag}"])
    losses = [{k: v for k, v in json.loads(line).items() if k.startswith("train_loss")}
              for line in (out / "log.txt").read_text().splitlines()]
    return losses, torch.load(out / "checkpoint_01.pth", map_location="cpu", weights_only=False)["model"]


def _same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def shard_pattern(tiny_world, tmp_path_factory):
    from tools.make_shards import make_shards

    out = tmp_path_factory.mktemp("shards")
    return make_shards([str(tiny_world / "pretrain.json")], str(out / "pt-%06d.tar"), samples_per_shard=16)["pattern"]


@pytest.mark.parametrize("source", ["json", "shards"])
def test_pretrain_losses_and_weights_are_the_same(source, tmp_path, tiny_world, shard_pattern, monkeypatch):
    keys = dict(test_file=None, augment=AUGMENT)
    if source == "shards":  # two loader workers: uint8 batches through shared memory
        keys.update(train_file=[], train_shards=shard_pattern, train_samples_per_epoch=64, num_workers=2)
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, **keys)
    losses, weights = _run(config, tmp_path / "float", "false")
    calls = _counting(monkeypatch)
    losses_u8, weights_u8 = _run(config, tmp_path / "uint8", "true")
    assert calls == [torch.uint8] * 16  # 2 epochs of 8 batches, each normalised by the trainer
    assert len(losses) == 2 and losses_u8 == losses  # exactly: the same floats reach the model
    assert _same_weights(weights, weights_u8)


def test_resume_may_switch_it(tmp_path, tiny_world):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world, test_file=None, augment=AUGMENT)
    _, weights = _run(config, tmp_path / "full", "false")
    out = tmp_path / "switched"
    Pretrain.main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--exit_after_epochs", "1"])
    losses, resumed = _run(config, out, "true", "--resume")  # not refused: the run computes the same
    assert len(losses) == 2 and _same_weights(weights, resumed)


def _task_config(script, tmp_path, world, task_files, vqa_files, grounding_set):  # noqa: F811
    """A one-epoch config of ``script`` on the tiny world, with random crops, flips and RandAugment."""
    from tests.test_classifiers_e2e import _classifier_config
    from tests.test_grounding_e2e import _config as _grounding_config
    from tests.test_retrieval import _retrieval_config
    from tests.test_vqa_e2e import _vqa_config

    path, aug = tmp_path / f"{script}.yaml", {"augment": AUGMENT}
    if script in ("VE", "NLVR"):
        return _classifier_config(path, world, task_files, script.lower(), val_file=None, **aug)
    if script == "VQA":
        return _vqa_config(path, world, vqa_files, **aug)
    if script == "Grounding":
        return _grounding_config(path, world, grounding_set, augment={"hflip": True, "randaugment": True})
    if script == "Retrieval":
        return _retrieval_config(path, world, val_file=None, test_file=None, **aug)
    return write_tiny_config(path, world, test_file=None, augment=AUGMENT, schedular={"epochs": 1})  # Pretrain_nlvr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["Retrieval", "VE", "NLVR", "VQA", "Grounding", "Pretrain_nlvr"])
def test_every_training_script_gets_the_same_losses(script, tmp_path, tiny_world, task_files, vqa_files,  # noqa: F811
                                                    grounding_set):  # noqa: F811
    import importlib

    main = importlib.import_module(script).main
    config = _task_config(script, tmp_path, tiny_world, task_files, vqa_files, grounding_set)
    logs = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--options",
              f"normalize_on_device={flag}"])
        line = json.loads((out / "log.txt").read_text().splitlines()[0])
        logs.append({k: v for k, v in line.items() if k.startswith("train_loss")})
    assert logs[0] and logs[0] == logs[1]
