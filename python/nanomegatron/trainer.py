"""Trainer: the C library's nm_trainer (model, optimizer, data, checkpoints, logs) behind the
design's usage code.

    with Trainer(config, run_dir="runs/mine") as trainer:
        for step, metrics in trainer.train():
            ...

A run directory is the CLI's: RUN_DIR/step_NNNNNN/ checkpoints, latest, metrics.jsonl,
TensorBoard events, loss.svg, and the two files the Trainer adds, train_config.json and
model_config.json, so that `nanomegatron train --config RUN_DIR/train_config.json --out
RUN_DIR --resume` continues a run the Trainer started, and Trainer(TrainConfig.from_file(C),
run_dir=RUN_DIR, resume=True) continues one the CLI started, bit for bit either way.
"""
import ctypes
import os
import signal
import sys
import threading

from . import _lib
from ._lib import NMError, lib
from .config import ModelConfig, StepMetrics, TrainConfig, _write_atomic
from .distributed import init_distributed
from .model import Model, _Handle


class Trainer:
    """One training run. run_dir holds its checkpoints and logs; a directory that already holds
    a run is refused unless resume=True, which continues from its newest valid checkpoint (or
    starts fresh when there is none). verbose=True prints the library's banner and progress
    line as the CLI does."""

    def __init__(self, config, run_dir="runs/python", *, resume=False, verbose=False, recompute=False):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer: expected a TrainConfig, got {type(config).__name__}")
        init_distributed()
        self.config = config
        self.run_dir = os.fspath(run_dir)
        if not resume and os.path.exists(os.path.join(self.run_dir, "latest")):
            raise FileExistsError(f"{self.run_dir} already holds a run (it has a 'latest' checkpoint): pass "
                                  f"resume=True to continue it, or choose another run_dir")
        config_path = self._write_config(self.run_dir)
        self._cfg = ctypes.create_string_buffer(_lib.TRAIN_CONFIG_BYTES)
        err = _lib.nm_error()
        if lib.nm_train_config_load(self._cfg, os.fsencode(config_path), None, 0, err) != 0:
            lib.nm_train_config_free(self._cfg)
            raise _lib.ConfigError(err.msg.decode("utf-8", "replace"))
        opts = _lib._new(_lib.nm_trainer_options)
        self._run_dir_b = os.fsencode(self.run_dir)
        opts.run_dir = self._run_dir_b
        opts.resume = int(bool(resume))
        opts.quiet = int(not verbose)
        opts.recompute = int(bool(recompute))
        ptr = ctypes.c_void_p()
        if verbose:
            sys.stdout.flush()
        rc = lib.nm_trainer_create(ctypes.byref(ptr), self._cfg, opts, err)
        if rc != 0:
            lib.nm_train_config_free(self._cfg)
            raise NMError(err.msg.decode("utf-8", "replace"))
        cfg_buf = self._cfg

        def destroy(p):
            lib.nm_trainer_destroy(p)
            lib.nm_train_config_free(cfg_buf)  # the trainer borrows the config: freed after it

        # The C trainer keeps pointers into both (its config's strings, opts.run_dir) until destroyed.
        self._h = _Handle(ptr.value, destroy, keep=(cfg_buf, self._run_dir_b, opts))
        self._last_saved = None
        self._stop = False
        self._model = None
        self.verbose = verbose

    def _write_config(self, run_dir):
        """train_config.json (+ model_config.json) in run_dir: what the CLI resumes with."""
        path = os.path.join(run_dir, "train_config.json")
        self.config.save(path)
        return path

    # --- the run --------------------------------------------------------------------------

    def _ptr(self):
        if self._h is None:
            raise NMError("Trainer: already shut down")
        return self._h.ptr

    @property
    def step_count(self):
        """Optimizer steps completed (including those of a resumed checkpoint)."""
        return lib.nm_trainer_step_count(self._ptr())

    @property
    def model(self):
        """The trainer's model: model.params / model.grads are numpy views by HF name.

        Under bf16 at world > 1 the distributed optimizer keeps the GEMM weights' fp32 values
        only in each rank's ranges (docs/parallelism.md, "Sharded master weights"): elsewhere
        they read zero here, and writing them fails the next step. Checkpoints hold them whole.
        """
        if self._model is None:
            p = lib.nm_trainer_model(self._ptr())
            cfg = self.config
            if isinstance(cfg.model, ModelConfig):
                m = cfg.model
            else:
                m = ModelConfig.from_hf(cfg.model if cfg.model is not None else cfg.init_from)
            self._model = Model(self._h, m, self.config.micro_batch_size or self.config.batch_size,
                                self.config.data.seq_len, p)
        return self._model

    def step(self):
        """One optimizer step: its StepMetrics, or None when the configured steps are done."""
        m = _lib._new(_lib.nm_step_metrics)
        err = _lib.nm_error()
        rc = lib.nm_trainer_step(self._ptr(), m, err)
        if rc < 0:
            raise NMError(err.msg.decode("utf-8", "replace"))
        if rc == 0:
            return None
        if self.config.save_every > 0 and m.step % self.config.save_every == 0:
            self._last_saved = m.step
        return StepMetrics._from_c(m)

    def train(self):
        """Yields (step, StepMetrics) after every optimizer step until max_steps, then writes the
        final checkpoint (as the CLI does) and finishes the logs. Ctrl-C (SIGINT) stops it
        cleanly: the step under way completes, a checkpoint of it is written, and the loop ends;
        a second Ctrl-C interrupts at once."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if self._stop:
                    raise KeyboardInterrupt
                self._stop = True
                print("\ninterrupted: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            self._stop = False
            while not self._stop:
                m = self.step()
                if m is None:
                    break
                yield m.step, m
            if self.step_count != self._last_saved:
                self.save_checkpoint()
            self.finish()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def stop(self):
        """Ends train() after the current step (what Ctrl-C does)."""
        self._stop = True

    def evaluate(self):
        """Mean validation cross-entropy (eval_batches micro-batches of the held-out split); None
        when there is no validation split."""
        v = ctypes.c_double()
        err = _lib.nm_error()
        _lib.check(lib.nm_trainer_evaluate(self._ptr(), ctypes.byref(v), err), err)
        return None if v.value != v.value else v.value

    def save_checkpoint(self, path=None):
        """Writes a checkpoint of the current step. path: a run directory to write it into (created
        if needed; default the trainer's run_dir): PATH/step_NNNNNN/ and PATH/latest, with the
        run's train_config.json, so `nanomegatron train --config PATH/train_config.json --out PATH
        --resume` or Trainer(config, run_dir=PATH, resume=True) continue from it. Returns the
        checkpoint directory."""
        err = _lib.nm_error()
        step = self.step_count
        if path is None or os.path.abspath(os.fspath(path)) == os.path.abspath(self.run_dir):
            _lib.check(lib.nm_trainer_save(self._ptr(), err), err)
            self._last_saved = step
            target = self.run_dir
        else:
            target = os.fspath(path)
            os.makedirs(target, exist_ok=True)
            self._write_config(target)
            _lib.check(lib.nm_trainer_save_to(self._ptr(), os.fsencode(target), err), err)
        return os.path.join(target, f"step_{step:06d}")

    def finish(self):
        """Flushes metrics.jsonl and TensorBoard, writes loss.svg. Idempotent."""
        err = _lib.nm_error()
        _lib.check(lib.nm_trainer_finish(self._ptr(), err), err)

    def shutdown(self):
        """Finishes the logs and releases the trainer (its memory goes once no numpy view of its
        parameters remains). Idempotent."""
        if self._h is None:
            return
        try:
            self.finish()
        finally:
            self._h = None
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.shutdown()
        return False
