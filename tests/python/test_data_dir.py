"""DataConfig(path=DIRECTORY): every prepared dataset in the directory, blended by its token
count (a Megatron data path list weighted by size); the Trainer trains on it, and the index
mappings it builds (RUN_DIR/index_cache) are mapped again, not rebuilt, when the run resumes."""
import json
import os
import random

import pytest

import nanomegatron as nm

from conftest import run_cli, small_model


def prepare(nm_bin, tmp_path, name, n_docs, seed):
    r = random.Random(seed)
    src = tmp_path / f"{name}.jsonl"
    with open(src, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": "".join(r.choice("abcdefgh \n") for _ in range(r.randrange(1, 200)))}) + "\n")
    run_cli(nm_bin, "prepare", "--input", str(src), "--tokenizer", "bytes", "--out", str(tmp_path / "data" / name),
            "--append-eod")


def tokens_of(nm_bin, prefix):
    out = run_cli(nm_bin, "inspect", "--data", prefix)
    return int(out.split(" tokens")[0].split()[-1])


def test_a_directory_of_datasets_trains_and_its_cache_is_reused(tmp_path, nm_bin):
    os.makedirs(tmp_path / "data")
    prepare(nm_bin, tmp_path, "a", 150, 1)
    prepare(nm_bin, tmp_path, "b", 300, 2)
    data = nm.DataConfig(path=str(tmp_path / "data"), seq_len=32)
    sources = data.sources()
    assert [os.path.basename(p) for p, _ in sources] == ["a", "b"]
    # weights are the token counts, as `inspect` counts them
    assert [w for _, w in sources] == [float(tokens_of(nm_bin, p)) for p, _ in sources]
    # The same config both times (the indices depend on the run's length: Megatron's num_samples)
    cfg = nm.TrainConfig(model=small_model(), data=data, batch_size=2, max_steps=3, eval_every=0, seed=3)
    run = tmp_path / "run"
    with nm.Trainer(cfg, run_dir=run) as trainer:
        trainer.step()
        trainer.step()
        trainer.save_checkpoint()
    cache = run / "index_cache"
    files = sorted(os.listdir(cache))
    # 2 datasets x (description + 3 arrays) and the blend's (description + 2 arrays), train split only
    assert len(files) == 11 and sum("-BlendedDataset-" in f for f in files) == 3, files
    stamps = {f: os.stat(cache / f).st_mtime_ns for f in files}
    with nm.Trainer(cfg, run_dir=run, resume=True) as trainer:
        assert [s for s, _ in trainer.train()] == [3]
    assert {f: os.stat(cache / f).st_mtime_ns for f in sorted(os.listdir(cache))} == stamps, "the cache was rebuilt"


def test_a_directory_without_datasets_is_refused(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(nm.ConfigError, match="holds no prepared dataset"):
        nm.DataConfig(path=str(tmp_path / "empty")).sources()


def test_a_jsonl_file_is_prepared_once(tmp_path):
    r = random.Random(5)
    src = tmp_path / "corpus.jsonl"
    with open(src, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": "".join(r.choice("abcdefgh \n") for _ in range(r.randrange(1, 200)))}) + "\n")
    data = nm.DataConfig(path=str(src), seq_len=32)
    cfg = nm.TrainConfig(model=small_model(), data=data, batch_size=2, max_steps=2, eval_every=0, seed=3)
    with nm.Trainer(cfg, run_dir=tmp_path / "r1") as trainer:
        assert [s for s, _ in trainer.train()] == [1, 2]
    prepared = tmp_path / ".nm_prepared"
    files = sorted(os.listdir(prepared))
    assert len(files) == 2 and files[0].startswith("corpus.jsonl-") and files[0].endswith(".bin"), files
    stamps = {f: os.stat(prepared / f).st_mtime_ns for f in files}
    with nm.Trainer(cfg, run_dir=tmp_path / "r2") as trainer:   # another run, the same file: reused
        assert [s for s, _ in trainer.train()] == [1, 2]
    assert {f: os.stat(prepared / f).st_mtime_ns for f in sorted(os.listdir(prepared))} == stamps
    with open(src, "a") as f:   # a changed file is prepared again, beside the old one
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert data.sources()[0][0] != cfg.data.sources()[0][0] or len(os.listdir(prepared)) == 4
    assert len(os.listdir(prepared)) == 4


def test_a_bad_jsonl_line_is_named(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(nm.ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        nm.DataConfig(path=str(src)).sources()
