"""Config loading: original keys and spelling, new keys, overrides, and errors that name the file and key."""
import glob
import os

import pytest
import yaml

from Pretrain import PretrainConfig
from utils.config import ConfigError, load_config, parse_overrides, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(p)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_validates(path):
    from engine.classification import ClassifierConfig
    from Grounding import GroundingConfig
    from Retrieval import RetrievalConfig
    from VQA import VQAConfig

    name = os.path.basename(path)
    cls = (RetrievalConfig if name.startswith("Retrieval") else VQAConfig if name.startswith("VQA") else
           GroundingConfig if name.startswith("Grounding") else
           ClassifierConfig if name.startswith(("VE", "NLVR.", "NLVR_tiny")) else PretrainConfig)
    cfg = load_config(cls, path)
    assert cfg.train_file
    bert = cfg.bert(path)
    assert bert.encoder_width == cfg.vit.embed_dim == cfg.vision_width


def test_original_retrieval_yaml_values():
    from Retrieval import RetrievalConfig

    coco = load_config(RetrievalConfig, os.path.join(ROOT, "configs", "Retrieval_coco.yaml"))
    flickr = load_config(RetrievalConfig, os.path.join(ROOT, "configs", "Retrieval_flickr.yaml"))
    assert (coco.k_test, flickr.k_test, coco.scheduler.epochs, flickr.scheduler.epochs) == (256, 128, 5, 10)
    assert coco.image_res == 384 and coco.batch_size_train == 32 and coco.optimizer.lr == 1e-5
    assert coco.distill and coco.warm_up and coco.rerank_score == "itm"


def test_original_task_yaml_values():
    from engine.classification import ClassifierConfig
    from VQA import VQAConfig

    ve = load_config(ClassifierConfig, os.path.join(ROOT, "configs", "VE.yaml"))
    assert (ve.batch_size_train, ve.batch_size_test, ve.warm_up, ve.scheduler.epochs) == (32, 64, False, 5)
    nlvr = load_config(ClassifierConfig, os.path.join(ROOT, "configs", "NLVR.yaml"))
    assert (nlvr.batch_size_train, nlvr.batch_size_test, nlvr.warm_up, nlvr.scheduler.epochs) == (16, 16, True, 10)
    ta = load_config(PretrainConfig, os.path.join(ROOT, "configs", "NLVR_pretrain.yaml"))
    assert (ta.batch_size, ta.image_res, ta.scheduler.epochs, ta.scheduler.min_lr) == (64, 256, 1, 1e-5)
    vqa = load_config(VQAConfig, os.path.join(ROOT, "configs", "VQA.yaml"))
    assert (vqa.k_test, vqa.batch_size_test, vqa.scheduler.epochs, vqa.scheduler.warmup_epochs) == (128, 16, 8, 4)
    assert len(vqa.train_file) == 3 and vqa.eos == "[SEP]" and vqa.optimizer.lr == 2e-5


def test_original_pretrain_yaml_values():
    cfg = load_config(PretrainConfig, os.path.join(ROOT, "configs", "Pretrain.yaml"))
    assert (cfg.image_res, cfg.batch_size, cfg.queue_size, cfg.momentum, cfg.alpha) == (256, 64, 65536, 0.995, 0.4)
    assert cfg.mlm_probability == 0.15 and cfg.embed_dim == 256 and cfg.temp == 0.07
    assert cfg.optimizer.opt == "adamW" and cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.02
    s = cfg.scheduler  # read from the original's misspelt `schedular`
    assert (s.epochs, s.min_lr, s.warmup_lr, s.warmup_epochs) == (30, 1e-5, 1e-5, 20)
    assert s.num_warmup_steps() == 2000
    assert (cfg.vit.patch_size, cfg.vit.embed_dim, cfg.vit.depth, cfg.vit.num_heads) == (16, 768, 12, 12)
    bert = cfg.bert("Pretrain.yaml")
    assert (bert.fusion_layer, bert.num_hidden_layers, bert.vocab_size) == (6, 12, 30522)


def test_yaml12_floats(tmp_path):
    """`lr: 1e-4` is a float (PyYAML alone would read a string)."""
    p = _write(tmp_path, "train_file: [a.json]\noptimizer: {opt: adamW, lr: 1e-4, weight_decay: 2e-2}\n")
    cfg = load_config(PretrainConfig, p)
    assert cfg.optimizer.lr == pytest.approx(1e-4) and cfg.optimizer.weight_decay == pytest.approx(0.02)


def test_unknown_key_names_file_and_key(tmp_path):
    p = _write(tmp_path, {"train_file": ["a.json"], "optimizer": {"lr": 1e-4, "momentun": 0.9}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*optimizer\.momentun.*unknown"):
        load_config(PretrainConfig, p)
    p = _write(tmp_path, {"train_file": ["a.json"], "batchsize": 3})
    with pytest.raises(ConfigError, match=r"c\.yaml.*batchsize"):
        load_config(PretrainConfig, p)


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, {"train_file": ["a.json"], "batch_size": "sixty"})
    with pytest.raises(ConfigError, match=r"batch_size: expected an integer"):
        load_config(PretrainConfig, p)
    p = _write(tmp_path, {"train_file": ["a.json"], "augment": {"hflip": "yes please"}})
    with pytest.raises(ConfigError, match=r"augment\.hflip: expected true/false"):
        load_config(PretrainConfig, p)
    p = _write(tmp_path, {"train_file": ["a.json"], "vit": {"embed_dim": 100, "num_heads": 3}})
    with pytest.raises(ConfigError, match=r"vit.*multiple"):
        load_config(PretrainConfig, p)


def test_missing_file_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="train_file .* or train_shards is required"):
        load_config(PretrainConfig, _write(tmp_path, {"batch_size": 4}))
    with pytest.raises(ConfigError, match="precision"):
        load_config(PretrainConfig, _write(tmp_path, {"train_file": "a.json", "precision": "fp8"}))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, _write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="k_test must be a positive"):
        load_config(PretrainConfig, _write(tmp_path, {"train_file": "a.json", "tokenizer": "t", "k_test": 0}))
    with pytest.raises(ConfigError, match="test_every must be"):
        load_config(PretrainConfig, _write(tmp_path, {"train_file": "a.json", "tokenizer": "t", "test_every": 0}))
    with pytest.raises(ConfigError, match="rerank_score must be"):
        load_config(PretrainConfig, _write(tmp_path, {"train_file": "a.json", "tokenizer": "t", "k_test": 4,
                                                      "rerank_score": "itc"}))


def test_overrides_and_alias(tmp_path):
    p = _write(tmp_path, {"train_file": ["a.json"], "schedular": {"epochs": 3}})
    cfg = load_config(PretrainConfig, p, ["optimizer.lr=2e-4", "batch_size=32", "schedular.epochs=5",
                                          "vit.depth=2", "text_encoder=null", "tokenizer=tok"])
    assert cfg.optimizer.lr == 2e-4 and cfg.batch_size == 32 and cfg.scheduler.epochs == 5
    assert cfg.vit.depth == 2 and cfg.text_encoder is None and cfg.tokenizer == "tok"
    assert cfg.scheduler.min_lr == 1e-5  # untouched keys keep the file's / default values
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        load_config(PretrainConfig, p, ["batch_size=abc"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["batch_size"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, os.path.join(ROOT, "configs", "Pretrain.yaml"), ["batch_size=7"])
    out = tmp_path / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(PretrainConfig, str(out))
    assert again == cfg


def test_inline_bert_config(tmp_path):
    p = _write(tmp_path, {"train_file": "a.json", "bert_config": {"hidden_size": 64, "num_attention_heads": 2,
                                                                  "vocab_size": 99, "fusion_layer": 1,
                                                                  "num_hidden_layers": 2, "encoder_width": 64}})
    bert = load_config(PretrainConfig, p).bert(p)
    assert bert.hidden_size == 64 and bert.vocab_size == 99
    p = _write(tmp_path, {"train_file": "a.json", "bert_config": {"hidden_sise": 64}})
    with pytest.raises(ValueError, match="hidden_sise"):
        load_config(PretrainConfig, p).bert(p)


class _StubTokenizer:
    """What ``ModelKeys.albef_config`` reads from a tokenizer."""

    pad_token_id, cls_token_id, mask_token_id = 0, 2, 4

    def __len__(self):
        return 10


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=-1e-4", "optimizer.lr"), ("optimizer.lr=0", "optimizer.lr"), ("optimizer.lr=.nan", "optimizer.lr"),
    ("optimizer.lr=.inf", "optimizer.lr"), ("schedular.warmup_lr=-1e-2", "schedular.warmup_lr"),
    ("schedular.warmup_lr=.nan", "schedular.warmup_lr"), ("schedular.min_lr=-1e-6", "schedular.min_lr"),
    ("schedular.min_lr=.inf", "schedular.min_lr"), ("schedular.warmup_epochs=-1", "schedular.warmup_epochs"),
    ("schedular.warmup_steps=-5", "schedular.warmup_steps"), ("schedular.decay_rate=0", "schedular.decay_rate"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"), ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
    ("optimizer.betas=[-0.1,0.999]", "optimizer.betas"), ("optimizer.eps=0", "optimizer.eps"),
    ("queue_size=0", "queue_size"), ("momentum=1.5", "momentum"), ("momentum=-0.1", "momentum"),
    ("mlm_probability=0", "mlm_probability"), ("mlm_probability=1", "mlm_probability"), ("temp=0", "temp"),
    ("temp=.nan", "temp"), ("embed_dim=0", "embed_dim"),
])
def test_out_of_range_value_is_a_config_error_naming_the_key(override, key, monkeypatch):
    """Optimizer and scheduler keys fail on load; the model keys when the model config is built from them (as
    Pretrain.build_model does), with the config file named in both cases."""
    monkeypatch.chdir(ROOT)  # bert_config is relative to the repository
    path = os.path.join("configs", "Pretrain_tiny.yaml")
    with pytest.raises(ConfigError) as info:
        cfg = load_config(PretrainConfig, path, [override])
        cfg.albef_config(_StubTokenizer(), path, cfg.mlm_probability)
    assert key in str(info.value) and "Pretrain_tiny.yaml" in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["schedular.warmup_lr=0", "schedular.min_lr=0"],  # a warm-up from 0 and a cosine to 0 are legitimate
    ["optimizer.weight_decay=0", "optimizer.betas=[0,0]", "schedular.warmup_epochs=0", "schedular.warmup_steps=0"],
    ["momentum=0", "optimizer.lr=1e-30"], ["momentum=1"],
])
def test_edge_values_in_range_load(overrides, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = os.path.join("configs", "Pretrain_tiny.yaml")
    cfg = load_config(PretrainConfig, path, overrides)
    cfg.albef_config(_StubTokenizer(), path, cfg.mlm_probability)


def test_itm_negatives_key(tmp_path):
    from models.albef import ALBEFConfig

    p = _write(tmp_path, {"train_file": "a.json", "itm_negatives": "global"})
    assert load_config(PretrainConfig, p).itm_negatives == "global"
    assert load_config(PretrainConfig, _write(tmp_path, {"train_file": "a.json"})).itm_negatives == "local"
    with pytest.raises(ValueError, match="itm_negatives must be 'local' or 'global'"):
        ALBEFConfig(itm_negatives="globl")


def test_original_grounding_yaml_values():
    from Grounding import GroundingConfig

    cfg = load_config(GroundingConfig, os.path.join(ROOT, "configs", "Grounding.yaml"))
    assert cfg.image_res == 384 and cfg.batch_size == 32 and cfg.optimizer.lr == 1e-5
    assert cfg.scheduler.epochs == 5 and cfg.scheduler.min_lr == 1e-6 and cfg.alpha == 0.4 and cfg.distill
    assert cfg.refcoco_data == "data" and cfg.det_file == "data/refcoco+/dets.json"
    assert cfg.gradcam_mode == "itm" and cfg.block_num == 8 and cfg.score_alpha == 0.5
    assert len(cfg.test_file) == 2


@pytest.mark.parametrize("flags", [["--local-rank=0"], ["--local_rank", "1"], ["--world_size", "8", "--dist_url",
                                                                               "env://", "--distributed", "True"]])
def test_the_original_launch_flags_are_accepted(flags):
    """`python -m torch.distributed.launch` without --use_env passes --local-rank (or --local_rank in older torch);
    the original's --world_size / --dist_url / --distributed too: accepted, the environment decides."""
    from engine.recipe import base_parser

    args = base_parser("x", "c.yaml", "out").parse_args(["--config", "a.yaml"] + flags)
    assert args.config == "a.yaml"
