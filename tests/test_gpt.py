"""The small GPT of chapter 08 (flashcourse/gpt.py): the copy task, and training on every backend.

The flash backend runs in Triton's interpreter on CPU, a fraction of a second to seconds a step, so
its default-suite run is a tiny model for a few steps; the run that learns the task is marked slow.
Every run takes the ``device`` fixture (the GPU when there is one), float32 at IEEE precision.
"""

import dataclasses

import numpy as np
import pytest
import torch

import flashcourse._env as env
from flashcourse.gpt import GPT, GPTConfig, copy_batch, train

TINY = GPTConfig(n_layer=1, n_head=1, n_embd=16, n_symbols=8, copy_len=4, batch_size=2)


def test_copy_batch_scores_only_the_copy(device):
    config = GPTConfig(copy_len=5, batch_size=3)
    idx, targets = copy_batch(config, torch.Generator().manual_seed(0), device=device)
    assert idx.device.type == targets.device.type == device
    L = config.copy_len
    assert idx.shape == targets.shape == (3, config.block_size)
    assert (idx[:, L] == config.n_symbols).all() and (idx[:, :L] < config.n_symbols).all()
    assert (targets[:, :L] == -1).all()
    # the answer at position p is the token copy_len places back: only attention can fetch it
    assert torch.equal(targets[:, L:], idx[:, :L])


def test_gpt_shapes_and_errors(device):
    model = GPT(TINY, backend="naive").to(device)
    idx, targets = copy_batch(TINY, device=device)
    logits, loss = model(idx, targets)
    assert logits.shape == (*idx.shape, TINY.vocab_size) and loss.dim() == 0
    assert model(idx)[1] is None
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        GPT(TINY, backend="fast")


def test_loss_falls_well_below_chance(device):
    config = GPTConfig()
    losses = train(config, backend="naive", steps=100, seed=0, device=device)
    assert abs(losses[0] - config.chance_loss) < 0.5  # starts at chance
    assert np.mean(losses[-10:]) < 0.05 * config.chance_loss


def test_same_seed_same_curve_and_the_callers_random_state_is_untouched(device):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train(TINY, backend="naive", steps=5, seed=1, device=device)
    assert torch.equal(torch.rand(1), before)
    assert a == train(TINY, backend="naive", steps=5, seed=1, device=device)
    assert a != train(TINY, backend="naive", steps=5, seed=2, device=device)


@pytest.mark.parametrize("backend", ["tiled", "sdpa"])
def test_backends_give_the_same_curve_as_naive(backend, device):
    config = dataclasses.replace(GPTConfig(), n_kv_head=1)  # grouped-query heads too
    naive = train(config, backend="naive", steps=60, seed=0, device=device)
    np.testing.assert_allclose(train(config, backend=backend, steps=60, seed=0, device=device), naive,
                               rtol=1e-3, atol=1e-4)


def test_flash_gives_the_same_curve_as_naive(device):
    np.testing.assert_allclose(train(TINY, "flash", steps=5, seed=0, device=device),
                               train(TINY, "naive", steps=5, seed=0, device=device), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_flash_learns_the_copy_task_like_naive(device):
    config = GPTConfig(n_layer=1, n_head=1, n_symbols=8, copy_len=4)  # one head is enough to copy
    flash = train(config, backend="flash", steps=40, seed=0, device=device)
    np.testing.assert_allclose(flash, train(config, backend="naive", steps=40, seed=0, device=device),
                               rtol=1e-3, atol=1e-4)
    assert np.mean(flash[-10:]) < 0.1 * config.chance_loss


def test_a_gpu_device_without_one_is_explained(monkeypatch):
    monkeypatch.setattr(env, "CUDA_BUILT", False)
    with pytest.raises(ValueError, match="CPU-only build.*README.*device='cpu'"):
        train(TINY, "naive", steps=1, device="cuda")
    with pytest.raises(ValueError, match="CPU-only build"):
        copy_batch(TINY, device="cuda:0")
