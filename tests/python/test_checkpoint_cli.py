"""Checkpoints interchange with the CLI bit for bit: a run started in Python and continued by
`nanomegatron train --resume`, and a run started by the CLI and continued in Python, end with
the same parameters, AdamW moments, data cursor and losses as one uninterrupted CLI run."""
import json
import os
import shutil

import pytest

import nanomegatron as nm

from conftest import run_cli, small_model

STEPS = 6
STATE_FILES = ("model.safetensors", "optim_m.safetensors", "optim_v.safetensors")


def config():
    # MTP, the bias update, the aux loss, clipping and a warm-up + cosine schedule all carry
    # state across the interruption; batch 4 as 2 micro-batches of 2 tests accumulation too.
    return nm.TrainConfig(model=small_model(), data=nm.DataConfig(path=None, seq_len=32, synthetic_tokens=65536),
                          batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=2, max_steps=STEPS, keep_last=0,
                          eval_every=3, eval_batches=1, seed=4321)


def losses(run_dir):
    """metrics.jsonl without the timings and the peak memory (the only fields that may differ:
    measurements of the machine, not of the training)."""
    out = []
    measured = ("tokens_per_s", "tflops", "mfu", "rss_peak_bytes")
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        d = json.loads(line)
        out.append({k: v for k, v in d.items() if not k.startswith("time_") and k not in measured})
    return out


def trainer_state(ckpt):
    d = json.load(open(os.path.join(ckpt, "trainer.json")))
    return {k: d[k] for k in ("step", "tokens", "data_cursor", "optimizer_step", "skipped_steps")}


def assert_same_checkpoint(a, b):
    for f in STATE_FILES:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    assert trainer_state(a) == trainer_state(b)


@pytest.fixture
def reference(tmp_path, nm_bin):
    """The uninterrupted CLI run, from the config file the Python side writes."""
    cfg_dir = tmp_path / "cfg"
    config().save(cfg_dir / "train_config.json")
    ref = tmp_path / "ref"
    run_cli(nm_bin, "train", "--config", str(cfg_dir / "train_config.json"), "--out", str(ref), "--quiet",
            "--set", "checkpoint.save_every=3")
    return cfg_dir / "train_config.json", ref


def test_python_run_resumes_in_the_cli(tmp_path, nm_bin, reference):
    cfg_file, ref = reference
    run = tmp_path / "py"
    with nm.Trainer(config(), run_dir=run) as trainer:
        for _ in range(3):
            trainer.step()
        trainer.save_checkpoint()
    # The Python trainer's step-3 checkpoint is the CLI's step-3 checkpoint.
    assert_same_checkpoint(run / "step_000003", ref / "step_000003")
    run_cli(nm_bin, "train", "--config", str(run / "train_config.json"), "--out", str(run), "--resume", "--quiet")
    assert_same_checkpoint(run / f"step_{STEPS:06d}", ref / f"step_{STEPS:06d}")
    assert losses(run) == losses(ref)


def test_cli_run_resumes_in_python(tmp_path, nm_bin, reference):
    cfg_file, ref = reference
    run = tmp_path / "cli"
    shutil.copytree(ref, run)
    # Make it a run the CLI left at step 3: drop the later checkpoint, point latest back.
    shutil.rmtree(run / f"step_{STEPS:06d}")
    (run / "latest").write_text("step_000003\n")
    cfg = nm.TrainConfig.from_file(cfg_file)
    assert cfg == config()
    seen = []
    with nm.Trainer(cfg, run_dir=run, resume=True) as trainer:
        assert trainer.step_count == 3
        for step, m in trainer.train():
            seen.append((step, m.loss, m.val_loss))
    assert [s for s, _, _ in seen] == [4, 5, 6]
    assert_same_checkpoint(run / f"step_{STEPS:06d}", ref / f"step_{STEPS:06d}")
    assert losses(run) == losses(ref)
    # The yielded metrics are the log's numbers.
    ref_log = {d["step"]: d for d in losses(ref)}
    for step, loss, val in seen:
        assert loss == ref_log[step]["loss"]
        assert val == ref_log[step].get("val_loss")


def test_save_checkpoint_into_another_run_dir(tmp_path, nm_bin, reference):
    cfg_file, ref = reference
    with nm.Trainer(config(), run_dir=tmp_path / "a") as trainer:
        for _ in range(3):
            trainer.step()
        where = trainer.save_checkpoint(tmp_path / "elsewhere")
    assert where == os.path.join(tmp_path / "elsewhere", "step_000003")
    assert_same_checkpoint(where, ref / "step_000003")
    # It is a run directory of its own: the CLI continues it.
    run_cli(nm_bin, "train", "--config", str(tmp_path / "elsewhere" / "train_config.json"), "--out",
            str(tmp_path / "elsewhere"), "--resume", "--quiet")
    assert_same_checkpoint(tmp_path / "elsewhere" / f"step_{STEPS:06d}", ref / f"step_{STEPS:06d}")


def test_a_run_dir_is_not_overwritten(tmp_path, reference):
    _, ref = reference
    with pytest.raises(FileExistsError, match="resume=True"):
        nm.Trainer(config(), run_dir=ref)
