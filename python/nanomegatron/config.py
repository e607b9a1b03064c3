"""ModelConfig, DataConfig, TrainConfig and StepMetrics: frozen dataclasses with the design's
field names, validated by the C library as they are made (the same checks as the CLI).

The C library speaks JSON: a ModelConfig is a Hugging Face config.json (to_hf), a TrainConfig
is a training config (configs/*-train.json, to_json). Every error the library reports is a
ConfigError (a ValueError) with its message, which names the key; the dataclass field the key
comes from is added in brackets.
"""
import ctypes
import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

from . import _lib
from ._lib import ConfigError, lib


def _strict(cls):
    """Unknown keyword arguments are a ConfigError (also a TypeError) naming the key."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args, **kwargs):
        for k in kwargs:
            if k not in names:
                close = difflib.get_close_matches(k, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _KeyError(f"{cls.__name__}: unknown key '{k}'{hint}")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


class _KeyError(ConfigError, TypeError):
    """An unknown keyword: a ValueError like every config error, and a TypeError like any bad keyword."""


_KeyError.__module__ = "nanomegatron"


def _annotate(msg, key_to_field, cls_name):
    """Adds "[Cls.field]" after the first quoted C key of msg that maps to a dataclass field."""
    for key in re.findall(r"key '([^']+)'", msg) + re.findall(r"'([a-z_.]+)'", msg):
        base = re.sub(r"\[\d+\].*$", "", key)
        if base in key_to_field:
            return f"{msg} [{cls_name}.{key_to_field[base]}]"
    return msg


# --- ModelConfig ------------------------------------------------------------------------------

# field -> Hugging Face config.json key, where they differ.
_MODEL_HF_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_experts": "n_routed_experts",
    "num_active_experts": "num_experts_per_tok",
    "mla_q_lora_rank": "q_lora_rank",
    "mla_kv_lora_rank": "kv_lora_rank",
    "mla_qk_nope_dim": "qk_nope_head_dim",
    "mla_qk_rope_dim": "qk_rope_head_dim",
    "mla_v_head_dim": "v_head_dim",
}


@_strict
@dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3 architecture. Field names are the design's; to_hf() / from_hf() map them to
    and from a Hugging Face config.json. The defaults are the project's tiny model
    (configs/tiny.json: 6.3M parameters, byte vocabulary); the behavioural keys (sigmoid
    scores, noaux_tc routing, normalised top-k, scaling 2.5, one shared expert, one MTP depth)
    are DeepSeek-V3's."""
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    num_experts: int = 16
    num_active_experts: int = 4
    mla_q_lora_rank: Optional[int] = 128     # None (or 0): plain q_proj, as DeepSeek-V2-Lite
    mla_kv_lora_rank: int = 64
    mla_qk_nope_dim: int = 32
    mla_qk_rope_dim: int = 16
    mla_v_head_dim: int = 32
    routed_scaling_factor: float = 2.5
    n_shared_experts: int = 1
    vocab_size: int = 512
    intermediate_size: int = 640             # dense SwiGLU layers
    moe_intermediate_size: int = 128         # one routed expert
    num_nextn_predict_layers: int = 1        # MTP depth
    n_group: int = 4
    topk_group: int = 2
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None      # {"type": "yarn", "factor": ..., ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1

    def __post_init__(self):
        cfg = _lib._new(_lib.nm_model_config)
        err = _lib.nm_error()
        text = json.dumps(self.to_hf()).encode()
        if lib.nm_model_config_parse(cfg, text, b"ModelConfig", err) != 0:
            raise ConfigError(_annotate(err.msg.decode(), {v: k for k, v in self.hf_keys().items()}, "ModelConfig"))
        lib.nm_model_config_free(cfg)

    @staticmethod
    def hf_keys():
        """Field name -> config.json key, for every field."""
        return {f.name: _MODEL_HF_KEYS.get(f.name, f.name) for f in dataclasses.fields(ModelConfig)}

    def to_hf(self):
        """The Hugging Face DeepseekV3 config.json (a dict) of this architecture."""
        d = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for name, key in self.hf_keys().items():
            d[key] = getattr(self, name)
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        d["torch_dtype"] = "float32"
        return d

    @classmethod
    def from_hf(cls, path):
        """Reads a config.json (or the one in a model directory) as the CLI does: missing keys take
        the Hugging Face DeepseekV3Config defaults, impossible values raise ConfigError."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        raw = json.loads(text)
        c = _lib._new(_lib.nm_model_config)
        err = _lib.nm_error()
        _lib.check(lib.nm_model_config_parse(c, text.encode(), os.fsencode(path), err), err, ConfigError)
        try:
            rope = None
            if c.yarn:
                rp = raw.get("rope_parameters") or raw.get("rope_scaling")
                rope = {k: v for k, v in rp.items() if k != "rope_theta"}
            return cls(
                hidden_size=c.D, num_layers=c.L, num_attention_heads=c.H, num_experts=c.E, num_active_experts=c.K,
                mla_q_lora_rank=c.Rq if c.Rq > 0 else None, mla_kv_lora_rank=c.Rkv, mla_qk_nope_dim=c.Dn,
                mla_qk_rope_dim=c.Dr, mla_v_head_dim=c.Dv, routed_scaling_factor=c.routed_scaling,
                n_shared_experts=c.n_shared, vocab_size=c.V, intermediate_size=c.F, moe_intermediate_size=c.Fe,
                num_nextn_predict_layers=c.M, n_group=c.G, topk_group=c.Gk, norm_topk_prob=bool(c.norm_topk_prob),
                scoring_func=("sigmoid", "softmax")[c.scoring],
                topk_method=("noaux_tc", "greedy", "group_limited_greedy")[c.topk_method],
                first_k_dense_replace=c.first_k_dense, moe_layer_freq=c.moe_layer_freq, rms_norm_eps=c.rms_eps,
                rope_theta=c.rope_theta, rope_scaling=rope, max_position_embeddings=c.max_pos,
                tie_word_embeddings=bool(c.tie_embeddings), initializer_range=c.init_std,
                bos_token_id=c.bos_id if c.bos_id >= 0 else None, eos_token_id=c.eos_id if c.eos_id >= 0 else None)
        finally:
            lib.nm_model_config_free(c)

    def save(self, path):
        """Writes to_hf() to path (a config.json), atomically."""
        _write_atomic(path, json.dumps(self.to_hf(), indent=2) + "\n")


# --- DataConfig -------------------------------------------------------------------------------

@_strict
@dataclass(frozen=True)
class DataConfig:
    """What to train on. path: a Megatron dataset prefix (PREFIX.bin / PREFIX.idx), a directory
    of prepared datasets (every PREFIX.idx there with its PREFIX.bin, blended by their token
    counts, as a Megatron data path list weighted by size), a text or JSONL file (.txt, .jsonl,
    .json: prepared once, with the training config's tokenizer, into a .nm_prepared directory
    beside it, and reused while the file and the tokenizer are unchanged), a list of prefixes
    or of (prefix, weight) pairs to blend, or None for the built-in corpus (of
    synthetic_tokens tokens). split: Megatron's train,valid[,test] weights."""
    path: Union[None, str, Sequence] = None
    seq_len: int = 256
    split: str = "99,1"
    synthetic_tokens: int = 2097152
    cache_dir: Optional[str] = None   # index mappings built once and memory-mapped; None: RUN_DIR/index_cache
    cache_per_node: bool = False      # the first rank of each node builds them (node-local disks); else rank 0

    def __post_init__(self):
        if isinstance(self.path, list):   # frozen and hashable: lists become tuples
            object.__setattr__(self, "path", tuple(tuple(p) if isinstance(p, list) else p for p in self.path))

    def sources(self, tokenizer="bytes"):
        """[(prefix, weight), ...], [] for the built-in corpus. tokenizer: what a text or JSONL
        path is prepared with ("bytes" or a tokenizer.json)."""
        if self.path is None:
            return []
        if isinstance(self.path, (str, os.PathLike)) and os.path.isdir(self.path):
            return _datasets_in(os.fspath(self.path))
        if isinstance(self.path, (str, os.PathLike)) and os.fspath(self.path).lower().endswith(_TEXT_SUFFIXES):
            return [(_prepared(os.fspath(self.path), tokenizer), 1.0)]
        if isinstance(self.path, (str, os.PathLike)):
            return [(os.fspath(self.path), 1.0)]
        out = []
        for p in self.path:
            if isinstance(p, (str, os.PathLike)):
                out.append((os.fspath(p), 1.0))
            elif isinstance(p, tuple) and len(p) == 2:
                out.append((os.fspath(p[0]), float(p[1])))
            else:
                raise ConfigError(f"DataConfig: key 'path': expected a prefix or a (prefix, weight) pair, got {p!r}")
        return out


_TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def _stamp(path):
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _prepared(path, tokenizer):
    """The dataset prefix of a text / JSONL file prepared with tokenizer (EOD appended, as
    `nanomegatron prepare --append-eod`), in PATH_DIR/.nm_prepared/NAME-HASH: the hash covers
    the file's and the tokenizer's path, size and modification time, so a changed file or
    tokenizer is prepared again and an unchanged one is reused. The library writes both files
    atomically; ranks that prepare at once write the same bytes."""
    import hashlib
    if not os.path.isfile(path):
        raise ConfigError(f"DataConfig: key 'path': {path} is not a file, a directory or a dataset prefix")
    tok = tokenizer if tokenizer == "bytes" else _stamp(tokenizer)
    digest = hashlib.sha256(f"{_stamp(path)}|{tok}|append_eod".encode()).hexdigest()[:16]
    out_dir = os.path.join(os.path.dirname(os.path.abspath(path)), ".nm_prepared")
    prefix = os.path.join(out_dir, f"{os.path.basename(path)}-{digest}")
    if os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin"):
        return prefix
    os.makedirs(out_dir, exist_ok=True)
    import ctypes
    inputs = (ctypes.c_char_p * 1)(os.fsencode(path))
    opts = _lib._new(_lib.nm_prepare_opts)
    opts.inputs = ctypes.cast(inputs, ctypes.POINTER(ctypes.c_char_p))
    opts.n_inputs = 1
    opts.tokenizer = os.fsencode(tokenizer)
    opts.out_prefix = os.fsencode(prefix)
    opts.append_eod = 1
    stats = _lib._new(_lib.nm_prepare_stats)
    err = _lib._new(_lib.nm_error)
    _lib.check(_lib.lib.nm_prepare_run(opts, stats, err), err, ConfigError)
    return prefix


def _dataset_tokens(prefix):
    """Tokens of a Megatron dataset: the sum of its .idx's sequence lengths (docs/formats.md 1.3:
    a 34-byte header, then int32 lengths)."""
    import numpy
    with open(prefix + ".idx", "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
            raise ConfigError(f"DataConfig: key 'path': {prefix}.idx is not a Megatron index (MMIDIDX header)")
        n_seqs = int.from_bytes(head[18:26], "little")
        lengths = numpy.fromfile(f, dtype="<i4", count=n_seqs)
    if len(lengths) != n_seqs:
        raise ConfigError(f"DataConfig: key 'path': {prefix}.idx is truncated ({len(lengths)} of {n_seqs} lengths)")
    return int(lengths.sum(dtype=numpy.int64))


def _datasets_in(directory):
    """[(prefix, tokens)] of every prepared dataset in a directory, sorted by name."""
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".idx"):
            continue
        prefix = os.path.join(directory, name[:-4])
        if not os.path.exists(prefix + ".bin"):
            raise ConfigError(f"DataConfig: key 'path': {prefix}.idx has no {prefix}.bin beside it")
        tokens = _dataset_tokens(prefix)
        if tokens > 0:
            out.append((prefix, float(tokens)))
    if not out:
        raise ConfigError(f"DataConfig: key 'path': the directory {directory} holds no prepared dataset "
                          f"(PREFIX.bin + PREFIX.idx, as `nanomegatron prepare` writes)")
    return out


# --- TrainConfig ------------------------------------------------------------------------------

# field -> training-config key (src/train/train_config.h) for the fields that are one key each.
_TRAIN_KEYS = {
    "max_steps": "steps", "precision": "precision", "backend": "backend", "seed": "seed", "threads": "threads",
    "tokenizer": "tokenizer", "init_from": "init_from",
    "lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "beta1": "optimizer.beta1", "beta2": "optimizer.beta2",
    "eps": "optimizer.eps", "weight_decay": "optimizer.weight_decay", "clip_grad": "optimizer.clip_grad",
    "exp_avg_dtype": "optimizer.exp_avg_dtype", "exp_avg_sq_dtype": "optimizer.exp_avg_sq_dtype",
    "lr_schedule": "schedule.type", "warmup_steps": "schedule.warmup_steps",
    "decay_start": "schedule.decay_start", "decay_steps": "schedule.decay_steps",
    "decay_fraction": "schedule.decay_fraction", "decay_shape": "schedule.decay_shape",
    "bias_update_speed": "balance.bias_update_speed", "bias_update_stop_step": "balance.bias_update_stop_step",
    "aux_weight": "balance.aux_weight",
    "mtp_weight": "mtp.weight", "mtp_weight_after": "mtp.weight_after", "mtp_switch_step": "mtp.switch_step",
    "save_every": "checkpoint.save_every", "keep_last": "checkpoint.keep_last",
    "log_every": "log.log_every", "eval_every": "log.eval_every", "eval_batches": "log.eval_batches",
    # The parallel layout (data parallelism is what the world size leaves).
    "tensor_parallel_size": "tensor_parallel_size", "pipeline_parallel_size": "pipeline_parallel_size",
    "expert_parallel_size": "expert_parallel_size", "moe_receive_capacity": "moe_receive_capacity",
    "recompute_granularity": "recompute_granularity", "recompute_modules": "recompute_modules",
    "bucket_mb": "bucket_mb", "exit_interval": "exit_interval",
    "overlap_grad_reduce": "overlap_grad_reduce", "sequence_parallel": "sequence_parallel",
    "data_parallel_sharding_strategy": "data_parallel_sharding_strategy",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "pipeline_model_parallel_layout": "pipeline_model_parallel_layout",
    "virtual_pipeline_model_parallel_size": "virtual_pipeline_model_parallel_size",
    "moe_shared_expert_overlap": "moe_shared_expert_overlap",
    "overlap_moe_expert_parallel_comm": "overlap_moe_expert_parallel_comm",
    "moe_pair_micro_batches": "moe_pair_micro_batches",
    "communicator": "communicator",
}
_PARALLEL = ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size")
# C keys that come from model / data / batch_size rather than from one field each.
_TRAIN_KEY_FIELDS = dict({v: k for k, v in _TRAIN_KEYS.items()}, **{
    "model": "model", "data.synthetic": "data", "data.synthetic_tokens": "data.synthetic_tokens",
    "data.paths": "data.path", "data.split": "data.split", "data.cache_dir": "data.cache_dir",
    "data.cache_per_node": "data.cache_per_node", "seq_len": "data.seq_len",
    "global_batch": "batch_size", "micro_batch": "micro_batch_size"})


@_strict
@dataclass(frozen=True)
class TrainConfig:
    """A training run: every key of the training config (`nanomegatron train --help`), with the
    same defaults. batch_size is the global batch (rows per optimizer step, all ranks);
    micro_batch_size the rows of one forward/backward (None: the whole batch per rank, no
    gradient accumulation). model is a ModelConfig or the path of a config.json; None with
    init_from (a Hugging Face model directory) to continue pre-training."""
    model: Union[ModelConfig, str, None] = ModelConfig()
    data: DataConfig = DataConfig()
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 0
    max_steps: int = 1000
    micro_batch_size: Optional[int] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_model_parallel_layout: str = ""
    virtual_pipeline_model_parallel_size: int = 0  # interleaved 1F1B chunks per rank (0: from the layout, else 1)
    expert_parallel_size: int = 1
    moe_receive_capacity: float = 2.0
    moe_shared_expert_overlap: bool = False  # the shared experts inside the expert all-to-all
    overlap_moe_expert_parallel_comm: bool = False  # the expert exchange in two pipelined parts
    moe_pair_micro_batches: bool = False  # micro-batch i+1's forward beside i's backward (DualPipe's overlap)
    communicator: str = "auto"  # auto (mpi under a launcher, else single), single, mpi, nccl
    recompute_granularity: str = ""  # full (every block, as --recompute) or selective (recompute_modules)
    recompute_modules: str = ""
    bucket_mb: int = 40
    overlap_grad_reduce: bool = False
    data_parallel_sharding_strategy: str = "optim"  # optim (ZeRO-1) or optim_grads (ZeRO-2)
    sequence_parallel: bool = True
    make_vocab_size_divisible_by: int = 128
    exit_interval: int = 0
    init_from: Optional[str] = None
    tokenizer: str = "bytes"
    precision: str = "fp32"
    backend: str = "cpu"
    seed: int = 1234
    threads: int = 0
    min_lr: float = 3e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    lr_schedule: str = "cosine"
    decay_start: int = 0
    decay_steps: int = 0
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    bias_update_speed: float = 0.001
    bias_update_stop_step: int = 0
    aux_weight: float = 1e-4
    mtp_weight: float = 0.3
    mtp_weight_after: float = 0.1
    mtp_switch_step: int = 0
    save_every: int = 0
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 10

    def __post_init__(self):
        if not isinstance(self.model, (ModelConfig, str, os.PathLike, type(None))):
            raise ConfigError(f"TrainConfig: key 'model': expected a ModelConfig or a config.json path, "
                              f"got {type(self.model).__name__}")
        if not isinstance(self.data, DataConfig):
            raise ConfigError(f"TrainConfig: key 'data': expected a DataConfig, got {type(self.data).__name__}")
        for name in _PARALLEL:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"TrainConfig: key '{name}' = {v!r}: must be an integer >= 1")
        # The library's own checks, on the config with a stand-in model path.
        _parse_train_json(json.dumps(self.to_json("model_config.json")))

    @property
    def world_size(self):
        """Processes in the run (the library's world communicator, see init_distributed)."""
        from .distributed import init_distributed
        return init_distributed().world_size

    @property
    def data_parallel_size(self):
        """world / (tensor x pipeline), as Megatron derives it."""
        tp_pp = self.tensor_parallel_size * self.pipeline_parallel_size
        world = self.world_size
        if world % tp_pp != 0:
            raise ConfigError(f"TrainConfig: world size {world} is not a multiple of tensor_parallel_size x "
                              f"pipeline_parallel_size = {tp_pp}")
        return world // tp_pp

    def to_json(self, model_path=None):
        """The training config as the library reads it (a dict; json.dump it for the CLI's --config).
        model_path: where the ModelConfig's config.json is (required when model is a ModelConfig);
        a relative path is relative to the file the dict is written to, as for the CLI."""
        if isinstance(self.model, ModelConfig):
            if model_path is None:
                raise ValueError("to_json: model is a ModelConfig; give model_path, where its config.json is written")
            model = os.fspath(model_path)
        else:
            model = os.path.abspath(os.fspath(self.model)) if self.model is not None else None
        d = {"model": model}
        data = {"synthetic": self.data.path is None, "synthetic_tokens": self.data.synthetic_tokens,
                "paths": [{"prefix": os.path.abspath(p), "weight": w} for p, w in self.data.sources(self.tokenizer)],
                "split": self.data.split, "cache_dir": os.path.abspath(self.data.cache_dir) if self.data.cache_dir else "",
                "cache_per_node": bool(self.data.cache_per_node)}
        d["data"] = data
        d["seq_len"] = self.data.seq_len
        d["micro_batch"] = self.micro_batch_size if self.micro_batch_size is not None else self.batch_size
        d["global_batch"] = self.batch_size
        for name, key in _TRAIN_KEYS.items():
            value = getattr(self, name)
            if name in ("init_from", "tokenizer") and value not in (None, "bytes"):
                value = os.path.abspath(os.fspath(value))
            node = d
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return d

    def save(self, path):
        """Writes the config for `nanomegatron train --config`: path (the training config) and,
        when model is a ModelConfig, model_config.json next to it. Both atomically."""
        path = os.fspath(path)
        d = self.to_json("model_config.json")
        if isinstance(self.model, ModelConfig):
            self.model.save(os.path.join(os.path.dirname(os.path.abspath(path)), "model_config.json"))
        _write_atomic(path, json.dumps(d, indent=2) + "\n")

    @classmethod
    def from_file(cls, path, overrides=()):
        """Reads a training config file as `nanomegatron train --config path [--set k=v]...` does."""
        buf = ctypes.create_string_buffer(_lib.TRAIN_CONFIG_BYTES)
        err = _lib.nm_error()
        ov = (ctypes.c_char_p * max(len(overrides), 1))(*[o.encode() for o in overrides])
        try:
            _lib.check(lib.nm_train_config_load(buf, os.fsencode(path), ov, len(overrides), err), err, ConfigError)
            d = json.loads(_lib.take_string(lib.nm_train_config_to_json(buf)))
        finally:
            lib.nm_train_config_free(buf)
        return cls.from_json(d)

    @classmethod
    def from_json(cls, d):
        """From the library's JSON form (nm_train_config_to_json: every key, paths resolved)."""
        flat = _flatten(d)
        kw = {}
        for name, key in _TRAIN_KEYS.items():
            if key in flat:
                kw[name] = flat[key]
        model = flat.get("model")
        kw["model"] = ModelConfig.from_hf(model) if model else None
        paths = flat.get("data.paths") or []
        src = None
        if not flat.get("data.synthetic"):
            src = [(p["prefix"], p["weight"]) for p in paths]
            if len(src) == 1 and src[0][1] == 1.0:
                src = src[0][0]
        kw["data"] = DataConfig(path=src, seq_len=flat["seq_len"], split=flat["data.split"],
                                synthetic_tokens=flat["data.synthetic_tokens"], cache_dir=flat.get("data.cache_dir") or None,
                                cache_per_node=bool(flat.get("data.cache_per_node", False)))
        kw["batch_size"] = flat["global_batch"]
        kw["micro_batch_size"] = None if flat["micro_batch"] == flat["global_batch"] else flat["micro_batch"]
        return cls(**kw)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _parse_train_json(text, base_dir=None):
    """Checks a training config text with the library; raises ConfigError naming the key."""
    buf = ctypes.create_string_buffer(_lib.TRAIN_CONFIG_BYTES)
    err = _lib.nm_error()
    rc = lib.nm_train_config_parse(buf, text.encode(), b"TrainConfig", os.fsencode(base_dir or ""), None, 0, err)
    lib.nm_train_config_free(buf)
    if rc != 0:
        raise ConfigError(_annotate(err.msg.decode("utf-8", "replace"), _TRAIN_KEY_FIELDS, "TrainConfig"))


def _write_atomic(path, text):
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- StepMetrics ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, as its metrics.jsonl line. loss is the total objective (ce + mtp_weight
    x mtp + aux_weight x aux); ce_loss the main next-token cross-entropy; val_loss None unless
    the step evaluated."""
    step: int
    steps_total: int
    loss: float
    ce_loss: float
    mtp_loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    mtp_weight: float
    tokens: int
    tokens_per_sec: float
    tflops: float
    mfu: float
    expert_load_max_over_mean: float
    bias_min: float
    bias_max: float
    skipped: bool
    skipped_total: int
    time_data_s: float
    time_forward_s: float
    time_backward_s: float
    time_optimizer_s: float
    val_loss: Optional[float] = None

    @classmethod
    def _from_c(cls, m):
        return cls(step=m.step, steps_total=m.steps_total, loss=m.loss, ce_loss=m.ce_loss, mtp_loss=m.mtp_loss,
                   aux_loss=m.aux_loss, grad_norm=m.grad_norm, lr=m.lr, mtp_weight=m.mtp_weight, tokens=m.tokens,
                   tokens_per_sec=m.tokens_per_s, tflops=m.tflops, mfu=m.mfu,
                   expert_load_max_over_mean=m.load_max_over_mean, bias_min=m.bias_min, bias_max=m.bias_max,
                   skipped=bool(m.skipped), skipped_total=m.skipped_total, time_data_s=m.t_data,
                   time_forward_s=m.t_forward, time_backward_s=m.t_backward, time_optimizer_s=m.t_optimizer,
                   val_loss=None if math.isnan(m.val_loss) else m.val_loss)
