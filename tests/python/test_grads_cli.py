"""Gradients read through the package's numpy views equal `nanomegatron forward --grads` on
the same model and batch, bit for bit (same library code, same thread count: every reduction
has a fixed order), and create_model's initialisation equals `nanomegatron init`'s. The CLI's
files are read with the independent `safetensors` package."""
import json
import random

import numpy as np
import pytest

import nanomegatron as nm

from conftest import run_cli, small_model

st = pytest.importorskip("safetensors.numpy")


@pytest.fixture
def seed():
    s = random.SystemRandom().randrange(1, 2**31)
    print(f"seed {s}")
    return s


def test_grads_equal_cli_forward(tmp_path, nm_bin, seed):
    cfg = small_model(num_nextn_predict_layers=1)
    cfg.save(tmp_path / "model.json")
    hf = tmp_path / "init"
    run_cli(nm_bin, "init", "--config", str(tmp_path / "model.json"), "--out", str(hf), "--seed", str(seed))
    file_params = st.load_file(str(hf / "model.safetensors"))

    model = nm.create_model(nm.ModelConfig.from_hf(hf), nm.init_distributed(), max_batch_size=3, max_seq_len=32,
                            seed=seed)
    assert set(model.params) == set(file_params)
    for name, value in file_params.items():
        assert np.array_equal(model.params[name], value), name

    # Move away from the initialisation through the views (zero router biases would hide a
    # bias mistake; an untrained model's gradients are also atypically uniform).
    rng = np.random.default_rng(seed)
    for name in model.params:
        v = model.params[name]
        if name.endswith("e_score_correction_bias"):
            v[...] = rng.normal(0, 0.01, v.shape)
        elif not (".embed_tokens." in name and name.startswith("model.layers.")) and "shared_head.head" not in name:
            v += rng.normal(0, 0.002, v.shape).astype(np.float32)   # tied MTP copies view their owner
    model.save_hf(tmp_path / "moved")

    loader = nm.DataLoader(nm.DataConfig(path=None, seq_len=32, synthetic_tokens=65536), batch_size=3, seed=seed)
    batch = loader.next_batch()
    assert batch.shape == (3, 33) and batch.dtype == np.int32
    loss, grads = nm.forward_backward(model, batch)

    batch.tofile(tmp_path / "tokens.bin")
    out = run_cli(nm_bin, "forward", "--model", str(tmp_path / "moved"), "--tokens", str(tmp_path / "tokens.bin"),
                  "--batch", "3", "--grads", str(tmp_path / "grads.safetensors"))
    cli = json.loads(out.strip().splitlines()[-1])
    assert loss == pytest.approx(cli["loss"], rel=1e-8)   # printed with %.9g
    assert model.last_loss.ce == pytest.approx(cli["ce_loss"], rel=1e-8)
    cli_grads = st.load_file(str(tmp_path / "grads.safetensors"))
    # The CLI's gradient file leaves out the MTP blocks' tied copies of embedding and head
    # (their gradient is their owner's); the views have them, aliasing the owner.
    tied = {n for n in grads if n.startswith("model.layers.2.") and ("embed_tokens" in n or "head.weight" in n)}
    assert set(cli_grads) == set(grads) - tied and len(tied) == 2
    assert np.shares_memory(grads["model.layers.2.embed_tokens.weight"], grads["model.embed_tokens.weight"])
    bad = [n for n in cli_grads if not np.array_equal(grads[n], cli_grads[n])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    assert any(np.abs(g).max() > 0 for g in cli_grads.values())


def test_accumulate_and_zero_copy(tmp_path):
    model = nm.create_model(small_model(), max_batch_size=2, max_seq_len=16)
    batch = np.random.default_rng(0).integers(0, 320, size=(2, 17), dtype=np.int32)
    _, grads = nm.forward_backward(model, batch)
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    one = grads[name].copy()
    view = grads[name]
    nm.forward_backward(model, batch, accumulate=True)
    # The view sees the library's buffer change; accumulating the same batch doubles it (to
    # rounding: the second pass adds into the first's sums, GEMM by GEMM).
    assert np.abs(one).max() > 0
    np.testing.assert_allclose(view, 2 * one, rtol=1e-5, atol=1e-6 * np.abs(one).max())
    assert not np.allclose(view, one)
    # Writing a parameter view writes the model the next forward uses.
    model.params["lm_head.weight"][...] = 0.0
    loss, _ = nm.forward_backward(model, batch, mtp_weight=0.0, aux_weight=0.0)
    assert loss == pytest.approx(np.log(320), rel=1e-6)   # uniform logits


def test_runtime_errors_are_exceptions():
    model = nm.create_model(small_model(), max_batch_size=2, max_seq_len=16)
    bad = np.zeros((2, 17), dtype=np.int32)
    bad[1, 5] = 999
    with pytest.raises(ValueError, match="token id 999 at row 1 position 5"):
        nm.forward_backward(model, bad)
    with pytest.raises(ValueError, match="outside the model's 1..2 rows"):
        nm.forward_backward(model, np.zeros((3, 17), dtype=np.int32))
    with pytest.raises(nm.NMError, match="nonexistent"):
        nm.DataLoader(nm.DataConfig(path="nonexistent/prefix", seq_len=16), batch_size=2)
    with pytest.raises(nm.NMError, match="nonexistent"):
        model.load_hf("nonexistent")
