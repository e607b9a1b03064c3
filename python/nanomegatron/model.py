"""The low-level layer: a model, an optimizer and a data loader to write one's own loop with.

    dist_ctx = init_distributed()
    model = create_model(model_config, dist_ctx)
    optimizer = create_optimizer(model, lr=1e-4)
    for batch in DataLoader(DataConfig(seq_len=256), batch_size=8, num_batches=100):
        loss, grads = forward_backward(model, batch)
        optimizer_step(optimizer, grads)

Under mpirun the same loop trains this rank's shard of a layout: init_distributed(
tensor_parallel_size=..., expert_parallel_size=...) places the rank, create_model(cfg, ctx)
builds its shard on the trainer's own machinery (nm_trainer with the caller's micro-batches:
the same mesh, tensor/expert split, distributed optimizer and gradient reduction as Trainer
and the CLI), create_dataloader(data, ctx, micro_batch=...) yields this data-parallel rank's
micro-batches in the trainer's order, and optimizer_step reduces, clips, updates and gathers
as the trainer's step does (its metrics, over the job, in optimizer.last_metrics).

Parameters and gradients live in the C library's buffers; model.params[name] and
grads[name] are numpy views of them by Hugging Face name (no copy): writing to a view writes
the model. A view keeps the C model alive, so it never outlives the memory it points at.
"""
import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import _lib
from ._lib import ConfigError, NMError, lib
from .config import DataConfig, ModelConfig
from .distributed import DistContext, init_distributed


class _Handle:
    """Owns one C object; destroys it when the last Python reference (views included) goes."""

    def __init__(self, ptr, destroy, keep=()):
        self.ptr = ptr
        self._destroy = destroy
        self._keep = keep  # objects the C object borrows from (must be destroyed after it)

    def __del__(self):
        if self.ptr:
            self._destroy(self.ptr)
            self.ptr = None


class TensorDict(Mapping):
    """Name -> float32 numpy view into one of the library's buffers (parameters, gradients,
    AdamW moments), laid out by the model's parameter table."""

    def __init__(self, owner, base, table, readonly=False):
        self._owner = owner        # the _Handle the buffer belongs to
        self._base = ctypes.cast(base, ctypes.c_void_p).value
        self._table = table        # {name: (offset, shape)}
        self._readonly = readonly  # views that may not be written (sharded master weights)

    def _view(self, raw):
        a = np.frombuffer(raw, dtype=np.float32)
        if self._readonly:
            a.flags.writeable = False
        return a

    def __getitem__(self, name):
        offset, shape = self._table[name]
        n = int(np.prod(shape))
        raw = (ctypes.c_float * n).from_address(self._base + 4 * offset)
        raw._nm_owner = self._owner
        return self._view(raw).reshape(shape)

    def __iter__(self):
        return iter(self._table)

    def __len__(self):
        return len(self._table)

    def flat(self):
        """The whole buffer (padding between tensors included) as one 1-D view."""
        n = self._table_floats
        raw = (ctypes.c_float * n).from_address(self._base)
        raw._nm_owner = self._owner
        return self._view(raw)


def _read_table(table_ptr):
    t = table_ptr.contents
    rows = {}
    for i in range(t.n_rows):
        r = t.rows[i]
        rows[r.name.decode()] = (r.offset, tuple(r.shape[:r.ndim]))
    return rows, t.n_floats


@dataclass(frozen=True)
class LossTerms:
    loss: float        # ce + mtp_weight * mtp + aux_weight * aux
    ce: float          # main next-token cross-entropy
    mtp: float         # mean over MTP depths of their cross-entropy
    aux: float         # sequence-wise balance loss, summed over MoE layers
    tokens: int


def _c_model_config(config):
    c = _lib._new(_lib.nm_model_config)
    err = _lib.nm_error()
    import json
    _lib.check(lib.nm_model_config_parse(c, json.dumps(config.to_hf()).encode(), b"ModelConfig", err), err,
               ConfigError)
    return c


class Model:
    """A DeepSeek-V3 model in the C library, with activations for batches up to
    (max_batch_size, max_seq_len + 1) tokens. Made by create_model, or by a Trainer
    (trainer.model)."""

    def __init__(self, handle, config, max_batch_size, max_seq_len, c_ptr):
        self._h = handle
        self.config = config
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self._ptr = c_ptr
        self._table, self._n_floats = _read_table(lib.nm_model_table(c_ptr))
        self.last_loss = None
        self._forward_done = False

    def _dict(self, base, readonly=False):
        d = TensorDict(self._h, base, self._table, readonly)
        d._table_floats = self._n_floats
        return d

    @property
    def params(self):
        """Parameters by HF name (views; MTP copies of embedding and head view the owner's data).

        Read-only while a trainer's distributed optimizer keeps the GEMM weights' fp32 values
        sharded (bf16 at world > 1): outside this rank's ranges they read zero."""
        if lib.nm_model_weights_sharded(self._ptr):
            return self._dict(lib.nm_model_params_view(self._ptr), readonly=True)
        return self._dict(lib.nm_model_params(self._ptr))

    @property
    def grads(self):
        """Gradients of the last forward_backward by HF name (views)."""
        return self._dict(lib.nm_model_grads(self._ptr))

    @property
    def names(self):
        return list(self._table)

    @property
    def num_params(self):
        t = lib.nm_model_table(self._ptr).contents
        return t.n_params_main + t.n_params_mtp

    def load_hf(self, path):
        """Loads the parameters of a Hugging Face model directory (config.json + safetensors) of
        the same architecture, as the CLI's --init-from does."""
        err = _lib.nm_error()
        _lib.check(lib.nm_hf_dir_load_params(os.fsencode(path), lib.nm_model_table(self._ptr),
                                             lib.nm_model_params(self._ptr), err), err)

    def save_hf(self, path, bf16=False):
        """Writes a Hugging Face model directory (config.json + model.safetensors)."""
        err = _lib.nm_error()
        _lib.check(lib.nm_hf_dir_save(os.fsencode(path), lib.nm_model_cfg(self._ptr), lib.nm_model_table(self._ptr),
                                      lib.nm_model_params(self._ptr), int(bool(bf16)), err), err)

    def _tokens(self, batch):
        arr = np.asarray(batch)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"batch: expected an integer array (B, T+1), got {arr.dtype} with shape {arr.shape}")
        B, T = arr.shape
        if not (1 <= B <= self.max_batch_size and 2 <= T <= self.max_seq_len + 1):
            raise ValueError(f"batch: shape ({B}, {T}) is outside the model's 1..{self.max_batch_size} rows x "
                             f"2..{self.max_seq_len + 1} tokens (create_model's max_batch_size / max_seq_len)")
        if arr.dtype != np.int32:
            if arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max:
                raise ValueError("batch: token ids outside int32")
            arr = arr.astype(np.int32)
        return np.ascontiguousarray(arr)


def create_model(model_config, dist_ctx=None, *, max_batch_size=8, max_seq_len=256, seed=1234,
                 precision="fp32", recompute=False, global_batch=None, **train_options):
    """A freshly initialised model (DeepSeek-V3 init, deterministic from seed, the same values as
    `nanomegatron init --seed`). Batches up to max_batch_size rows of max_seq_len + 1 tokens.

    On more than one rank (dist_ctx from init_distributed under mpirun) it is this rank's shard of
    dist_ctx's layout, trained with micro-batches of exactly max_batch_size rows of
    max_seq_len + 1 tokens, global_batch of them per step over the job (default: one per
    data-parallel rank); train_options are further TrainConfig fields of the step (mtp_weight,
    aux_weight, bias_update_speed, moe_receive_capacity, bucket_mb, overlap_grad_reduce, ...)."""
    if not isinstance(model_config, ModelConfig):
        raise TypeError(f"create_model: expected a ModelConfig, got {type(model_config).__name__}")
    if dist_ctx is None:
        dist_ctx = init_distributed()
    if dist_ctx.world_size != 1:
        return _create_sharded(model_config, dist_ctx, max_batch_size, max_seq_len, seed, precision, recompute,
                               global_batch, train_options)
    if train_options or global_batch is not None:
        raise TypeError(f"create_model: {', '.join(sorted(train_options)) or 'global_batch'}: options of the "
                        f"multi-rank step (under mpirun); one process steps with forward_backward's own arguments")
    if precision not in _lib.PRECISIONS:
        raise ConfigError(f"create_model: precision '{precision}': expected one of {', '.join(_lib.PRECISIONS)}")
    if max_batch_size < 1 or max_seq_len < 1:
        raise ValueError(f"create_model: max_batch_size = {max_batch_size} and max_seq_len = {max_seq_len} "
                         f"must be >= 1")
    c = _c_model_config(model_config)
    err = _lib.nm_error()
    ptr = ctypes.c_void_p()
    opts = _lib._new(_lib.nm_model_options)
    opts.recompute = int(bool(recompute))
    # NM_BACKEND, else the CPU backend, as the trainer picks: an instance the model's handle owns
    ops = ctypes.c_void_p()
    if lib.nm_backend_select(ctypes.byref(ops), None, err) != 0:
        lib.nm_model_config_free(c)
        _lib.check(-1, err, ConfigError)
    rc = lib.nm_model_create_ex(ctypes.byref(ptr), c, ops, max_batch_size, max_seq_len + 1, opts, err)
    if rc != 0:
        lib.nm_backend_destroy(ops)
        lib.nm_model_config_free(c)
        _lib.check(rc, err)

    def destroy(p, c=c, ops=ops.value):
        lib.nm_model_destroy(p)
        lib.nm_backend_destroy(ops)  # after the model, whose buffers went back through it
        lib.nm_model_config_free(c)

    handle = _Handle(ptr.value, destroy)
    _lib.check(lib.nm_model_set_precision(ptr, _lib.PRECISIONS[precision], err), err)
    lib.nm_params_init(lib.nm_model_params(ptr), lib.nm_model_table(ptr), c, seed)
    return Model(handle, model_config, max_batch_size, max_seq_len, ptr.value)


def _create_sharded(model_config, ctx, micro, seq_len, seed, precision, recompute, global_batch, options):
    """create_model on more than one rank: an nm_trainer that takes the caller's micro-batches
    (nm_trainer_options.external_data), writing no files."""
    import json
    import tempfile
    from .config import TrainConfig
    if ctx.pp > 1:
        raise NMError(f"create_model: pipeline_parallel_size {ctx.pp}: the 1F1B schedule interleaves the "
                      f"micro-batches of a step, so pipeline parallelism trains through Trainer or the CLI")
    fields = dict(model=model_config, data=DataConfig(seq_len=seq_len), micro_batch_size=micro,
                  batch_size=global_batch or micro * ctx.dp, tensor_parallel_size=ctx.tp,
                  expert_parallel_size=ctx.ep, precision=precision, seed=seed, max_steps=1, warmup_steps=0,
                  log_every=1, eval_every=0, save_every=0)
    fields.update(options)
    config = TrainConfig(**fields)
    cfg = ctypes.create_string_buffer(_lib.TRAIN_CONFIG_BYTES)
    err = _lib.nm_error()
    opts = _lib._new(_lib.nm_trainer_options)
    opts.quiet, opts.recompute, opts.external_data = 1, int(bool(recompute)), 1
    ptr = ctypes.c_void_p()
    # the config's files (train_config.json and the model_config.json it names), read by the
    # load and the create; the trainer itself writes none
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train_config.json")
        config.save(path)
        if lib.nm_train_config_load(cfg, os.fsencode(path), None, 0, err) != 0:
            lib.nm_train_config_free(cfg)
            raise ConfigError(err.msg.decode("utf-8", "replace"))
        if lib.nm_trainer_create(ctypes.byref(ptr), cfg, opts, err) != 0:
            lib.nm_train_config_free(cfg)
            raise NMError(err.msg.decode("utf-8", "replace"))

    def destroy(p, cfg=cfg):
        lib.nm_trainer_destroy(p)
        lib.nm_train_config_free(cfg)  # the trainer borrows the config: freed after it

    handle = _Handle(ptr.value, destroy, keep=(cfg, opts))
    model = Model(handle, model_config, micro, seq_len, lib.nm_trainer_model(ptr))
    model._trainer = ptr.value
    model._step_options = {"mtp_weight": config.mtp_weight, "aux_weight": config.aux_weight}
    model.dist_ctx = ctx
    return model


def forward_backward(model, batch, *, mtp_weight=0.3, aux_weight=1e-4, grad_scale=1.0, accumulate=False):
    """One forward and backward pass on batch (B, T+1) int32 tokens: inputs row[:-1], targets
    row[1:] (and further for MTP). Returns (loss, grads): the total loss (ce + mtp_weight x mtp
    + aux_weight x aux, as `nanomegatron forward` reports it) and model.grads. Gradients are
    zeroed first unless accumulate=True (then they add up, scaled by grad_scale)."""
    tokens = model._tokens(batch)
    B, T = tokens.shape
    err = _lib.nm_error()
    if getattr(model, "_trainer", None):
        return _forward_backward_sharded(model, tokens, mtp_weight, aux_weight, grad_scale, accumulate)
    opt = _lib._new(_lib.nm_loss_options)
    opt.mtp_weight, opt.aux_weight, opt.grad_scale = mtp_weight, aux_weight, grad_scale
    lt = _lib._new(_lib.nm_loss_terms)
    if not accumulate:
        lib.nm_model_zero_grads(model._ptr)
    tok_ptr = tokens.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    _lib.check(lib.nm_model_forward(model._ptr, tok_ptr, B, T, opt, lt, None, err), err, ValueError)
    _lib.check(lib.nm_model_backward(model._ptr, err), err)
    model.last_loss = LossTerms(lt.loss, lt.ce, lt.mtp, lt.aux, lt.tokens)
    return lt.loss, model.grads


def _forward_backward_sharded(model, tokens, mtp_weight, aux_weight, grad_scale, accumulate):
    """One micro-batch of the multi-rank step (nm_trainer_micro_batch): its gradients are added to
    the step's, scaled so that the reduction over data-parallel ranks is the global batch's mean."""
    B, T = tokens.shape
    if (B, T) != (model.max_batch_size, model.max_seq_len + 1):
        raise ValueError(f"batch: shape ({B}, {T}): every micro-batch of a multi-rank step is "
                         f"({model.max_batch_size}, {model.max_seq_len + 1}) (create_model's max_batch_size, "
                         f"max_seq_len + 1)")
    given = {"mtp_weight": mtp_weight, "aux_weight": aux_weight}
    if given != model._step_options or grad_scale != 1.0 or accumulate:
        raise ValueError("forward_backward: on more than one rank the loss weights are create_model's (mtp_weight, "
                         "aux_weight) and the micro-batches of a step accumulate by themselves; grad_scale and "
                         "accumulate are for one process")
    err = _lib.nm_error()
    lt = _lib._new(_lib.nm_loss_terms)
    tok_ptr = tokens.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    _lib.check(lib.nm_trainer_micro_batch(model._trainer, tok_ptr, lt, err), err)
    model.last_loss = LossTerms(lt.loss, lt.ce, lt.mtp, lt.aux, lt.tokens)
    return lt.loss, model.grads


class Optimizer:
    """AdamW over a model's parameters (torch.optim.AdamW's update, DeepSeek-V3 defaults), with
    clipping to the global gradient norm; router biases and tied copies are left alone."""

    def __init__(self, model, lr, beta1, beta2, eps, weight_decay, clip_grad):
        self.model = model
        self.lr = lr
        self.clip_grad = clip_grad
        cfg = _lib._new(_lib.nm_adamw_config)
        cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay = beta1, beta2, eps, weight_decay
        err = _lib.nm_error()
        ptr = ctypes.POINTER(_lib.nm_optimizer)()
        if not lr > 0:
            raise ConfigError(f"create_optimizer: lr = {lr}: must be > 0")
        self.last_metrics = None
        if getattr(model, "_trainer", None):
            # the trainer's distributed optimizer (equal ranges of every tensor over the ranks)
            _lib.check(lib.nm_trainer_set_adamw(model._trainer, beta1, beta2, eps, weight_decay, clip_grad, err), err,
                       ConfigError)
            self._h, self._ptr = model._h, None
            return
        _lib.check(lib.nm_optimizer_create(ctypes.byref(ptr), lib.nm_model_table(model._ptr), cfg,
                                           lib.nm_model_ops(model._ptr), err), err, ConfigError)
        # The optimizer borrows the model's parameter table: the model's handle outlives it.
        self._h = _Handle(ptr, lib.nm_optimizer_destroy, keep=(model._h,))
        self._ptr = ptr

    @property
    def step_count(self):
        if self._ptr is None:
            return lib.nm_trainer_step_count(self.model._trainer)
        return self._ptr.contents.step

    def _local(self):
        if self._ptr is None:
            raise NMError("the AdamW moments of a multi-rank model are sharded over the ranks (each holds equal "
                          "ranges of every tensor): save a checkpoint through Trainer to read them whole")

    @property
    def exp_avg(self):
        """AdamW first moments by parameter name (views)."""
        self._local()
        d = TensorDict(self._h, self._ptr.contents.m, self.model._table)
        d._table_floats = self.model._n_floats
        return d

    @property
    def exp_avg_sq(self):
        """AdamW second moments by parameter name (views)."""
        self._local()
        d = TensorDict(self._h, self._ptr.contents.v, self.model._table)
        d._table_floats = self.model._n_floats
        return d


def create_optimizer(model, lr=1e-4, *, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_grad=1.0):
    return Optimizer(model, lr, beta1, beta2, eps, weight_decay, clip_grad)


def optimizer_step(optimizer, grads, lr=None):
    """Clips the gradients to optimizer.clip_grad (global norm; 0: off) and applies one AdamW
    update at lr (default optimizer.lr). Returns the gradient norm before clipping. A NaN/Inf
    gradient raises NMError naming the tensor, and nothing is updated."""
    model = optimizer.model
    if getattr(model, "_trainer", None):
        return _optimizer_step_sharded(optimizer, grads, lr)
    if not isinstance(grads, TensorDict) or grads._base != ctypes.cast(lib.nm_model_grads(model._ptr),
                                                                       ctypes.c_void_p).value:
        raise ValueError("optimizer_step: grads must be the gradients of the optimizer's model "
                         "(as forward_backward returns them)")
    g = lib.nm_model_grads(model._ptr)
    rep = _lib._new(_lib.nm_grad_report)
    lib.nm_optimizer_check_grads(optimizer._ptr, g, optimizer.clip_grad, rep)
    if not rep.finite:
        name = rep.bad_name.decode() if rep.bad_name else "?"
        raise NMError(f"optimizer_step: non-finite gradient (first in {name}); update skipped")
    lib.nm_optimizer_step_scaled(optimizer._ptr, lib.nm_model_params(model._ptr), g, rep.clip_scale,
                                 optimizer.lr if lr is None else lr)
    return rep.norm


def _optimizer_step_sharded(optimizer, grads, lr):
    """The multi-rank step after its micro-batches (nm_trainer_apply): reduce over the ranks,
    check and clip, AdamW on this rank's ranges, gather, update the router biases."""
    model = optimizer.model
    if not isinstance(grads, TensorDict) or grads._base != ctypes.cast(lib.nm_model_grads(model._ptr),
                                                                       ctypes.c_void_p).value:
        raise ValueError("optimizer_step: grads must be the gradients of the optimizer's model "
                         "(as forward_backward returns them)")
    err = _lib.nm_error()
    m = _lib._new(_lib.nm_step_metrics)
    rc = lib.nm_trainer_apply(model._trainer, optimizer.lr if lr is None else lr, m, err)
    _lib.check(rc, err)
    optimizer.last_metrics = {k: getattr(m, k) for k in ("step", "loss", "ce_loss", "mtp_loss", "aux_loss",
                                                         "grad_norm", "lr", "load_max_over_mean", "skipped")}
    if rc == 0:
        raise NMError(f"optimizer_step: non-finite loss or gradient at step {m.step}; update skipped")
    return m.grad_norm


_SPLITS = {"train": _lib.NM_SPLIT_TRAIN, "valid": _lib.NM_SPLIT_VALID, "test": _lib.NM_SPLIT_TEST}


class DataLoader:
    """Batches of (batch_size, seq_len + 1) int32 tokens from a DataConfig, in the order the
    trainer reads them (Megatron's GPTDataset order, blended, split), endless unless num_batches
    is given. state() / set_state() are the resume cursor."""

    def __init__(self, data, batch_size, *, seed=1234, split="train", num_batches=None, num_samples=0,
                 dist_ctx=None):
        if not isinstance(data, DataConfig):
            raise TypeError(f"DataLoader: expected a DataConfig, got {type(data).__name__}")
        if split not in _SPLITS:
            raise ConfigError(f"DataLoader: split '{split}': expected train, valid or test")
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size = {batch_size}: must be >= 1")
        dist_ctx = dist_ctx or init_distributed()
        spec = _lib._new(_lib.nm_data_spec)
        lib.nm_data_spec_default(spec)
        sources = data.sources()
        # Both arrays stay alive while the loader is created (it reads them then only).
        self._prefixes = (ctypes.c_char_p * max(len(sources), 1))(*[os.fsencode(p) for p, _ in sources])
        self._weights = (ctypes.c_double * max(len(sources), 1))(*[float(w) for _, w in sources])
        spec.n_sources = len(sources)
        spec.prefixes = ctypes.cast(self._prefixes, ctypes.POINTER(ctypes.c_char_p))
        spec.weights = ctypes.cast(self._weights, ctypes.POINTER(ctypes.c_double))
        spec.synthetic_tokens = data.synthetic_tokens
        spec.seed = seed
        spec.seq_len = data.seq_len
        weights = [float(x) for x in data.split.split(",")]
        weights += [0.0] * (3 - len(weights))
        total = sum(weights)
        if len(weights) != 3 or total <= 0 or min(weights) < 0:
            raise ConfigError(f"DataConfig: key 'split' = \"{data.split}\": expected 1 to 3 comma-separated "
                              f"non-negative weights")
        for i in range(3):
            spec.split[i] = weights[i] / total
        spec.num_samples[_SPLITS[split]] = num_samples
        err = _lib.nm_error()
        ptr = ctypes.c_void_p()
        # one stream per data-parallel rank: tensor-parallel (and expert-folded) ranks of one dp
        # rank read the same micro-batches, as the trainer's loaders do
        _lib.check(lib.nm_loader_create(ctypes.byref(ptr), spec, _SPLITS[split], dist_ctx.dp_rank,
                                        dist_ctx.dp, err), err)
        self._h = _Handle(ptr.value, lib.nm_loader_destroy)
        self.batch_size = batch_size
        self.seq_len = data.seq_len
        self.num_batches = num_batches

    @property
    def entropy_floor(self):
        """The built-in corpus's exact entropy rate in nats/token (None for real data)."""
        v = lib.nm_loader_entropy_floor(self._h.ptr)
        return None if v != v else v

    def next_batch(self):
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int32)
        err = _lib.nm_error()
        _lib.check(lib.nm_loader_next_batch(self._h.ptr, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                            self.batch_size, err), err)
        return out

    def __iter__(self):
        n = 0
        while self.num_batches is None or n < self.num_batches:
            yield self.next_batch()
            n += 1

    def state(self):
        return lib.nm_loader_get_cursor(self._h.ptr).sample

    def set_state(self, sample):
        lib.nm_loader_set_cursor(self._h.ptr, _lib.nm_data_cursor(sample))


def create_dataloader(data, dist_ctx=None, *, micro_batch, seed=1234, split="train", num_batches=None,
                      global_batch=None, steps=0, start_step=0):
    """This data-parallel rank's micro-batches (micro_batch, seq_len + 1) int32, in the order the
    trainer reads them for the same data, seed and split (Megatron's GPTDataset order over
    steps x global_batch samples when steps is given). start_step resumes: the samples of the
    steps before it are skipped. global_batch defaults to micro_batch x dp (one micro-batch per
    rank and step)."""
    dist_ctx = dist_ctx or init_distributed()
    gb = global_batch or micro_batch * dist_ctx.dp
    loader = DataLoader(data, micro_batch, seed=seed, split=split, num_batches=num_batches,
                        num_samples=steps * gb, dist_ctx=dist_ctx)
    if start_step:
        loader.set_state(start_step * gb)
    return loader
