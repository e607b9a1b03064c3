"""The C library, loaded with ctypes, and the structs of include/nanomegatron.h mirrored.

Why ctypes and not cffi: the binding needs a few dozen functions and a dozen plain structs;
ctypes is in the standard library, so the package needs no compiler at import and no build
step of its own beyond the C library (CMake builds that), and works in any venv. cffi's ABI
mode would still need the structs restated as cdef text (it cannot read our header, which
includes the internal ones), and its API mode would add a C compile against Python's headers.
The price of ctypes is that a struct restated here could drift from the header: every
mirrored struct's size and every field's offset is compared with the C compiler's by
tests/python/test_layout.py.

Structs the C side fills (or reads) through a pointer are allocated with _new(), which
zero-fills a block of at least 4 KiB: a field appended to the C struct before this file
catches up reads as zero (its default) instead of overrunning Python's memory.
"""
import ctypes
import json
import os
from ctypes import (POINTER, c_char, c_char_p, c_double, c_float, c_int, c_int32, c_int64, c_uint, c_uint32,
                    c_uint64, c_void_p, c_size_t)

_HERE = os.path.dirname(os.path.abspath(__file__))


class NMError(RuntimeError):
    """An error reported by the C library; the message is its nm_error text."""


class ConfigError(NMError, ValueError):
    """A configuration key or value the library refuses (a ValueError naming the key)."""


NMError.__module__ = ConfigError.__module__ = "nanomegatron"


# --- structs ---------------------------------------------------------------------------------

class nm_error(ctypes.Structure):
    _fields_ = [("msg", c_char * 2048)]


class nm_model_config(ctypes.Structure):
    _fields_ = [(n, c_int64) for n in ("V", "D", "F", "Fe", "L", "M", "H", "H_kv", "Rq", "Rkv", "Dn", "Dr", "Dv",
                                       "E", "n_shared", "K", "G", "Gk", "first_k_dense", "moe_layer_freq")] + [
        ("routed_scaling", c_double), ("norm_topk_prob", c_int), ("scoring", c_int), ("topk_method", c_int),
        ("rms_eps", c_double), ("rope_theta", c_double), ("max_pos", c_int64), ("tie_embeddings", c_int),
        ("init_std", c_double), ("bos_id", c_int64), ("eos_id", c_int64),
        ("yarn", c_int), ("yarn_factor", c_double), ("yarn_orig_max_pos", c_int64), ("yarn_beta_fast", c_double),
        ("yarn_beta_slow", c_double), ("yarn_mscale", c_double), ("yarn_mscale_all_dim", c_double),
        ("Dqk", c_int64), ("Fs", c_int64), ("n_layers", c_int64), ("softmax_scale", c_double),
        ("rope_attn_factor", c_double), ("json_text", c_void_p), ("source_path", c_void_p),
    ]


class nm_tensor_spec(ctypes.Structure):
    _fields_ = [("name", c_char * 112), ("ndim", c_int), ("shape", c_int64 * 2), ("numel", c_int64),
                ("offset", c_size_t), ("flags", c_uint), ("layer", c_int), ("owner", c_int), ("init_key", c_int),
                ("tp_dim", c_int), ("full_shape", c_int64 * 2), ("tp_start", c_int64), ("tp_extent", c_int64)]


class nm_param_table(ctypes.Structure):
    _fields_ = [("rows", POINTER(nm_tensor_spec)), ("n_rows", c_int), ("n_floats", c_size_t),
                ("n_params_main", c_int64), ("n_params_mtp", c_int64), ("embed", c_size_t),
                ("final_norm", c_size_t), ("lm_head", c_size_t), ("layers", c_void_p),
                ("expert_first", c_int64), ("expert_count", c_int64), ("tp_rank", c_int64), ("tp_size", c_int64),
                ("vocab_padded", c_int64), ("embed_copy", c_int)]


class nm_trainer_options(ctypes.Structure):
    _fields_ = [("run_dir", c_char_p), ("resume", c_int), ("quiet", c_int), ("max_nan_streak", c_int64),
                ("before_backward", c_void_p), ("hook_ctx", c_void_p), ("recompute", c_int),
                ("allow_config_change", c_int), ("external_data", c_int)]


class nm_step_metrics(ctypes.Structure):
    _fields_ = [("step", c_int64), ("steps_total", c_int64)] + [
        (n, c_double) for n in ("loss", "ce_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s",
                                "tflops", "mfu", "load_max_over_mean", "bias_min", "bias_max", "val_loss")] + [
        ("skipped", c_int), ("t_data", c_double), ("t_forward", c_double), ("t_backward", c_double),
        ("t_optimizer", c_double), ("t_comm", c_double), ("tokens", c_int64), ("mtp_weight", c_double), ("skipped_total", c_int64)]


class nm_loss_options(ctypes.Structure):
    _fields_ = [("mtp_weight", c_float), ("aux_weight", c_float), ("grad_scale", c_float), ("inference", c_int)]


class nm_loss_terms(ctypes.Structure):
    _fields_ = [("loss", c_double), ("ce", c_double), ("mtp", c_double), ("aux", c_double), ("tokens", c_int64)]


class nm_model_options(ctypes.Structure):
    _fields_ = [("recompute", c_int), ("ep", c_void_p), ("tp", c_void_p), ("sequence_parallel", c_int),
                ("vocab_multiple", c_int64), ("vocab_tile", c_int64), ("stage", c_void_p), ("n_chunks", c_int64),
                ("act_slots", c_int64),
                ("moe_receive_capacity", c_double), ("precision", c_int), ("recompute_mla_up_proj", c_int),
                ("recompute_moe_act", c_int), ("recompute_layernorm", c_int), ("shared_expert_overlap", c_int),
                ("ep_split", c_int)]


class nm_adamw_config(ctypes.Structure):
    _fields_ = [("beta1", c_double), ("beta2", c_double), ("eps", c_double), ("weight_decay", c_double),
                ("exp_avg_bf16", c_int), ("exp_avg_sq_bf16", c_int)]


class nm_optimizer(ctypes.Structure):
    _fields_ = [("table", POINTER(nm_param_table)), ("cfg", nm_adamw_config), ("m", POINTER(c_float)),
                ("v", POINTER(c_float)), ("n_state", c_size_t), ("row_state", c_void_p), ("step", c_int64), ("chunks", c_void_p), ("n_chunks", c_int64),
                ("partials", c_void_p), ("n_params", c_int64), ("m16", c_void_p), ("v16", c_void_p),
                ("ops", c_void_p)]


class nm_grad_report(ctypes.Structure):
    _fields_ = [("norm", c_double), ("clip_scale", c_float), ("finite", c_int), ("bad_row", c_int),
                ("bad_name", c_char_p)]


class nm_data_spec(ctypes.Structure):
    # prefixes / weights: the caller's arrays of n_sources entries (no cap), read during create.
    _fields_ = [("n_sources", c_int), ("prefixes", POINTER(c_char_p)),
                ("weights", POINTER(c_double)), ("synthetic_tokens", c_int64),
                ("synthetic_seed", c_uint64), ("seed", c_uint32), ("seq_len", c_int64), ("split", c_double * 3),
                ("num_samples", c_int64 * 3), ("blend_surplus", c_double), ("cache_dir", c_char_p)]


class nm_data_cursor(ctypes.Structure):
    _fields_ = [("sample", c_int64)]


class nm_prepare_opts(ctypes.Structure):
    _fields_ = [("inputs", POINTER(c_char_p)), ("n_inputs", c_int), ("tokenizer", c_char_p), ("out_prefix", c_char_p),
                ("json_key", c_char_p), ("jsonl", c_int), ("doc_per_file", c_int), ("append_eod", c_int),
                ("workers", c_int), ("progress", c_int)]


class nm_prepare_stats(ctypes.Structure):
    _fields_ = [("bytes", c_int64), ("docs", c_int64), ("seqs", c_int64), ("tokens", c_int64), ("dtype", c_int),
                ("seconds", c_double)]


# Every struct above, by its C name (tests/python/test_layout.py compares them with the header).
STRUCTS = [nm_error, nm_model_config, nm_tensor_spec, nm_param_table, nm_trainer_options, nm_step_metrics,
           nm_loss_options, nm_loss_terms, nm_model_options, nm_adamw_config, nm_optimizer, nm_grad_report,
           nm_data_spec, nm_data_cursor, nm_prepare_opts, nm_prepare_stats]

# nm_train_config is only ever passed by pointer (the package talks to it in JSON), so it is an
# opaque block; the layout test checks the C struct fits.
TRAIN_CONFIG_BYTES = 16384

NM_TENSOR_DECAY, NM_TENSOR_TIED, NM_TENSOR_NORM, NM_TENSOR_ROUTER_BIAS, NM_TENSOR_EXPERT, NM_TENSOR_MTP = (
    1, 2, 4, 8, 16, 32)
NM_SPLIT_TRAIN, NM_SPLIT_VALID, NM_SPLIT_TEST = 0, 1, 2
PRECISIONS = {"fp32": 0, "bf16": 1, "fp8": 2}


def _new(struct_type):
    """A zeroed instance of struct_type in a block of at least 4 KiB (see the module doc)."""
    size = max(ctypes.sizeof(struct_type), 4096)
    buf = ctypes.create_string_buffer(size)
    obj = struct_type.from_buffer(buf)
    obj._nm_buf = buf  # keeps the block alive as long as the struct view
    return obj


# --- loading ---------------------------------------------------------------------------------

def library_path():
    """The shared object in use: $NM_LIBRARY if set, else the one installed with the package."""
    given = os.environ.get("NM_LIBRARY")
    if given:
        return given
    return os.path.join(_HERE, "libnanomegatron.so")


def build_info():
    """What setup.py recorded when it built the installed library (source hash, build dir)."""
    path = os.path.join(_HERE, "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _load():
    path = library_path()
    if not os.path.exists(path):
        raise ImportError(f"nanomegatron: the C library {path} is missing; install the package with "
                          f"`pip install ./python` (it builds the library with CMake) or set NM_LIBRARY")
    lib = ctypes.CDLL(path)
    err = POINTER(nm_error)
    P = c_void_p
    sigs = {
        # train config
        "nm_train_config_load": (c_int, [P, c_char_p, POINTER(c_char_p), c_int, err]),
        "nm_train_config_parse": (c_int, [P, c_char_p, c_char_p, c_char_p, POINTER(c_char_p), c_int, err]),
        "nm_train_config_free": (None, [P]),
        "nm_train_config_to_json": (c_void_p, [P]),
        "nm_free": (None, [c_void_p]),
        # model config
        "nm_model_config_parse": (c_int, [POINTER(nm_model_config), c_char_p, c_char_p, err]),
        "nm_model_config_free": (None, [POINTER(nm_model_config)]),
        "nm_hf_dir_load_config": (c_int, [c_char_p, POINTER(nm_model_config), err]),
        "nm_hf_dir_load_params": (c_int, [c_char_p, POINTER(nm_param_table), POINTER(c_float), err]),
        "nm_hf_dir_save": (c_int, [c_char_p, POINTER(nm_model_config), POINTER(nm_param_table), POINTER(c_float),
                                   c_int, err]),
        # trainer
        "nm_trainer_create": (c_int, [POINTER(c_void_p), P, POINTER(nm_trainer_options), err]),
        "nm_trainer_step": (c_int, [P, POINTER(nm_step_metrics), err]),
        "nm_trainer_save": (c_int, [P, err]),
        "nm_trainer_save_to": (c_int, [P, c_char_p, err]),
        "nm_trainer_evaluate": (c_int, [P, POINTER(c_double), err]),
        "nm_trainer_finish": (c_int, [P, err]),
        "nm_trainer_destroy": (None, [P]),
        "nm_trainer_model": (c_void_p, [P]),
        "nm_trainer_micro_batch": (c_int, [P, POINTER(c_int32), POINTER(nm_loss_terms), err]),
        "nm_trainer_apply": (c_int, [P, c_double, POINTER(nm_step_metrics), err]),
        "nm_trainer_set_adamw": (c_int, [P, c_double, c_double, c_double, c_double, c_double, err]),
        "nm_trainer_step_count": (c_int64, [P]),
        # model
        "nm_backend_select": (c_int, [POINTER(c_void_p), c_char_p, err]),
        "nm_backend_destroy": (None, [c_void_p]),
        "nm_model_ops": (c_void_p, [P]),
        "nm_model_create_ex": (c_int, [POINTER(c_void_p), POINTER(nm_model_config), c_void_p, c_int64, c_int64,
                                       POINTER(nm_model_options), err]),
        "nm_model_destroy": (None, [P]),
        "nm_model_params": (POINTER(c_float), [P]),
        "nm_model_params_view": (POINTER(c_float), [P]),
        "nm_model_weights_sharded": (c_int, [P]),
        "nm_model_grads": (POINTER(c_float), [P]),
        "nm_model_table": (POINTER(nm_param_table), [P]),
        "nm_model_cfg": (POINTER(nm_model_config), [P]),
        "nm_model_zero_grads": (None, [P]),
        "nm_model_set_precision": (c_int, [P, c_int, err]),
        "nm_model_forward": (c_int, [P, POINTER(c_int32), c_int64, c_int64, POINTER(nm_loss_options),
                                     POINTER(nm_loss_terms), POINTER(c_float), err]),
        "nm_model_backward": (c_int, [P, err]),
        "nm_params_init": (None, [POINTER(c_float), POINTER(nm_param_table), POINTER(nm_model_config), c_uint64]),
        # optimizer
        "nm_optimizer_create": (c_int, [POINTER(POINTER(nm_optimizer)), POINTER(nm_param_table),
                                        POINTER(nm_adamw_config), c_void_p, err]),
        "nm_optimizer_destroy": (None, [POINTER(nm_optimizer)]),
        "nm_optimizer_check_grads": (None, [POINTER(nm_optimizer), POINTER(c_float), c_double,
                                            POINTER(nm_grad_report)]),
        "nm_optimizer_step_scaled": (None, [POINTER(nm_optimizer), POINTER(c_float), POINTER(c_float), c_float,
                                            c_double]),
        # data
        "nm_data_spec_default": (None, [POINTER(nm_data_spec)]),
        "nm_loader_create": (c_int, [POINTER(c_void_p), POINTER(nm_data_spec), c_int, c_int, c_int, err]),
        "nm_loader_destroy": (None, [P]),
        "nm_loader_next_batch": (c_int, [P, POINTER(c_int32), c_int64, err]),
        "nm_loader_get_cursor": (nm_data_cursor, [P]),
        "nm_loader_set_cursor": (None, [P, nm_data_cursor]),
        "nm_loader_seq_len": (c_int64, [P]),
        "nm_loader_tokens": (c_int64, [P]),
        "nm_loader_entropy_floor": (c_double, [P]),
        "nm_prepare_run": (c_int, [POINTER(nm_prepare_opts), POINTER(nm_prepare_stats), err]),
        "nm_struct_size": (c_size_t, [c_char_p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    _check_sizes(lib, path)
    return lib


def _check_sizes(lib, path):
    """Every mirrored struct's size against the loaded library's own sizeof: a field added to the
    header without this file following (or a stale library) stops the import instead of corrupting
    memory. Field offsets are compared with the compiler's by tests/python/test_layout.py."""
    bad = []
    for st in STRUCTS:
        c_size = lib.nm_struct_size(st.__name__.encode())
        if c_size != ctypes.sizeof(st):
            bad.append(f"{st.__name__}: library {c_size} bytes, python/nanomegatron/_lib.py {ctypes.sizeof(st)}")
    c_size = lib.nm_struct_size(b"nm_train_config")
    if not 0 < c_size <= TRAIN_CONFIG_BYTES:
        bad.append(f"nm_train_config: library {c_size} bytes, the package's opaque block {TRAIN_CONFIG_BYTES}")
    if bad:
        raise ImportError(f"nanomegatron: the struct mirrors do not match the C library {path}: " + "; ".join(bad) +
                          " (reinstall with `pip install ./python`, or update the mirrors to include/nanomegatron.h)")


lib = _load()


def check(rc, err, exc=NMError):
    """Raises exc with the C message when rc < 0; returns rc otherwise."""
    if rc < 0:
        raise exc(err.msg.decode("utf-8", "replace"))
    return rc


def take_string(ptr):
    """A C string allocated by the library, as str, freed with nm_free."""
    if not ptr:
        return None
    try:
        return ctypes.string_at(ptr).decode("utf-8")
    finally:
        lib.nm_free(ptr)
