"""Configs: the dataclasses' defaults are the library's, HF config.json round trips, and
every bad config raises a ValueError naming the key."""
import json
import os

import pytest

import nanomegatron as nm
from nanomegatron import _lib

from conftest import ROOT, small_model


def test_train_config_defaults_are_the_library_defaults():
    # The library's own defaults: a config with nothing but a model, read back whole.
    c_json = nm.config._flatten(json.loads(_c_to_json('{"model": "m.json"}')))
    py_json = nm.config._flatten(nm.TrainConfig().to_json("m.json"))
    py_json["model"] = c_json["model"]
    assert py_json == c_json


def _c_to_json(text):
    import ctypes
    buf = ctypes.create_string_buffer(_lib.TRAIN_CONFIG_BYTES)
    err = _lib.nm_error()
    assert _lib.lib.nm_train_config_parse(buf, text.encode(), b"t", b"", None, 0, err) == 0, err.msg
    try:
        return _lib.take_string(_lib.lib.nm_train_config_to_json(buf))
    finally:
        _lib.lib.nm_train_config_free(buf)


def test_model_config_defaults_are_configs_tiny():
    assert nm.ModelConfig() == nm.ModelConfig.from_hf(os.path.join(ROOT, "configs", "tiny.json"))


@pytest.mark.parametrize("name", ["tiny.json", "small.json", "deepseek-v3.json"])
def test_hf_round_trip(name, tmp_path):
    cfg = nm.ModelConfig.from_hf(os.path.join(ROOT, "configs", name))
    cfg.save(tmp_path / "config.json")
    assert nm.ModelConfig.from_hf(tmp_path) == cfg
    # The C library reads both files as the same architecture, every derived value included.
    a, b = _lib._new(_lib.nm_model_config), _lib._new(_lib.nm_model_config)
    err = _lib.nm_error()
    with open(os.path.join(ROOT, "configs", name)) as f:
        assert _lib.lib.nm_model_config_parse(a, f.read().encode(), b"a", err) == 0
    assert _lib.lib.nm_model_config_parse(b, json.dumps(cfg.to_hf()).encode(), b"b", err) == 0
    for fname, _ in _lib.nm_model_config._fields_:
        if fname not in ("json_text", "source_path"):
            assert getattr(a, fname) == getattr(b, fname), fname
    _lib.lib.nm_model_config_free(a)
    _lib.lib.nm_model_config_free(b)


def test_yarn_and_plain_q_proj_round_trip(tmp_path):
    cfg = small_model(mla_q_lora_rank=None, rope_scaling={"type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 1024,
                                                          "mscale": 0.707, "mscale_all_dim": 0.707},
                      max_position_embeddings=4096, tie_word_embeddings=True)
    cfg.save(tmp_path / "config.json")
    assert nm.ModelConfig.from_hf(tmp_path) == cfg


def test_train_config_file_round_trip(tmp_path):
    cfg = nm.TrainConfig(model=small_model(), data=nm.DataConfig(seq_len=64, split="98,2"), batch_size=16,
                         micro_batch_size=4, lr=2e-3, min_lr=1e-4, warmup_steps=7, max_steps=50,
                         lr_schedule="wsd", decay_shape="1-sqrt", mtp_switch_step=20, save_every=10, eval_every=5)
    cfg.save(tmp_path / "train.json")
    assert nm.TrainConfig.from_file(tmp_path / "train.json") == cfg
    # --set overrides as on the command line
    assert nm.TrainConfig.from_file(tmp_path / "train.json", ["optimizer.lr=5e-4"]).lr == 5e-4
    # and the project's own configs
    tiny = nm.TrainConfig.from_file(os.path.join(ROOT, "configs", "tiny-train.json"))
    assert tiny.model == nm.ModelConfig() and tiny.batch_size == 16 and tiny.micro_batch_size == 8


@pytest.mark.parametrize("make, key, field", [
    (lambda: nm.ModelConfig(num_active_experts=32), "num_experts_per_tok", "ModelConfig.num_active_experts"),
    (lambda: nm.ModelConfig(num_experts=15), "n_group", None),
    (lambda: nm.ModelConfig(mla_qk_rope_dim=7), "qk_rope_head_dim", "ModelConfig.mla_qk_rope_dim"),
    (lambda: nm.ModelConfig(scoring_func="tanh"), "scoring_func", "ModelConfig.scoring_func"),
    (lambda: nm.ModelConfig(hidden_size="256"), "hidden_size", "ModelConfig.hidden_size"),
    (lambda: nm.ModelConfig(hiden_size=256), "hiden_size", "hidden_size"),
    (lambda: nm.TrainConfig(lr=-1.0), "optimizer.lr", "TrainConfig.lr"),
    (lambda: nm.TrainConfig(min_lr=1.0), "optimizer.min_lr", "TrainConfig.min_lr"),
    (lambda: nm.TrainConfig(batch_size=6, micro_batch_size=4), "global_batch", "TrainConfig.batch_size"),
    (lambda: nm.TrainConfig(precision="fp16"), "precision", "TrainConfig.precision"),
    (lambda: nm.TrainConfig(lr_schedule="linear"), "schedule.type", "TrainConfig.lr_schedule"),
    (lambda: nm.TrainConfig(data=nm.DataConfig(seq_len=0)), "seq_len", "TrainConfig.data.seq_len"),
    (lambda: nm.TrainConfig(data=nm.DataConfig(split="a,b")), "data.split", "TrainConfig.data.split"),
    (lambda: nm.TrainConfig(max_step=10), "max_step", "max_steps"),
    (lambda: nm.DataConfig(seqlen=10), "seqlen", "seq_len"),
    (lambda: nm.TrainConfig(expert_parallel_size=0), "expert_parallel_size", None),
    (lambda: nm.TrainConfig(bucket_mb=0), "bucket_mb", "TrainConfig.bucket_mb"),
    (lambda: nm.TrainConfig(model=None), "model", None),
])
def test_bad_config_raises_naming_the_key(make, key, field):
    with pytest.raises(ValueError) as e:
        make()
    assert f"'{key}'" in str(e.value)
    if field:
        assert field in str(e.value)


def test_from_hf_refuses_an_impossible_file(tmp_path):
    d = json.load(open(os.path.join(ROOT, "configs", "tiny.json")))
    d["topk_group"] = 9
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="'topk_group' = 9"):
        nm.ModelConfig.from_hf(tmp_path)


def test_configs_are_frozen():
    with pytest.raises(Exception):
        nm.ModelConfig().hidden_size = 1


def test_data_parallel_size_is_derived():
    assert nm.TrainConfig().data_parallel_size == 1


def test_every_training_key_round_trips(tmp_path):
    cfg = nm.TrainConfig(model=small_model(), expert_parallel_size=2, bucket_mb=7, exit_interval=3)
    cfg.save(tmp_path / "train.json")
    back = nm.TrainConfig.from_file(tmp_path / "train.json")
    assert (back.expert_parallel_size, back.bucket_mb, back.exit_interval) == (2, 7, 3)
    assert back == cfg


def test_one_process_without_a_launcher():
    ctx = nm.init_distributed()
    assert (ctx.rank, ctx.world_size) == (0, 1)
