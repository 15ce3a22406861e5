"""A small GPT that uses this package's attention, and a task it can only solve by attending (chapter 08).

The task is copying: the model reads ``copy_len`` random symbols, a separator, and must then repeat the
symbols. The answer at position p is the token ``copy_len`` places back, which an MLP alone cannot
see: one attention head has to learn to look there. Chance level is log(n_symbols).

    losses = train(GPTConfig(), backend="flash", steps=100, seed=0)
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from ._env import factory_device, resolve_device
from .nn import MultiHeadAttention


@dataclass
class GPTConfig:
    """The model, the copy task and the optimiser in one place."""

    # the model: pre-norm blocks of width n_embd with n_head query heads (n_kv_head key/value heads)
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: Optional[int] = None
    n_embd: int = 32
    # the task: copy_len symbols out of n_symbols, a separator, the same symbols again
    n_symbols: int = 16
    copy_len: int = 8
    # training
    batch_size: int = 8
    lr: float = 1e-2

    @property
    def vocab_size(self) -> int:
        """The symbols 0 .. n_symbols − 1 and the separator, token n_symbols."""
        return self.n_symbols + 1

    @property
    def block_size(self) -> int:
        """Tokens the model reads: the symbols, the separator, the copy less its last token."""
        return 2 * self.copy_len

    @property
    def chance_loss(self) -> float:
        """Cross-entropy of guessing the symbols uniformly: log(n_symbols)."""
        return math.log(self.n_symbols)


def copy_batch(config: GPTConfig, generator: Optional[torch.Generator] = None, device=None):
    """A batch of the copy task: idx (batch_size, block_size) and targets of the same shape.

    The sequence is x_1 .. x_L, SEP, x_1 .. x_L; the model reads all but its last token and is
    scored only on the copy: targets are −1 (ignored) before the separator. ``device``: where the
    batch goes (None: PyTorch's default device).
    """
    device = factory_device(device)
    L = config.copy_len
    x = torch.randint(config.n_symbols, (config.batch_size, L), generator=generator)
    sep = torch.full((config.batch_size, 1), config.n_symbols)
    seq = torch.cat([x, sep, x], dim=1)  # (batch, 2L + 1)
    idx, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, :L] = -1  # x_2 .. x_L are random and the separator is fixed: nothing to learn there
    return idx.to(device), targets.to(device)


class Block(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: GPTConfig, backend: str):
        super().__init__()
        E = config.n_embd
        self.ln_1 = nn.LayerNorm(E)
        self.attn = MultiHeadAttention(E, config.n_head, num_kv_heads=config.n_kv_head, causal=True, backend=backend)
        self.ln_2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embedding, ``n_layer`` blocks, a final norm and the LM head."""

    def __init__(self, config: GPTConfig, backend: str = "flash"):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, backend) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        """idx (B, N) token ids -> logits (B, N, vocab_size) and, given targets (B, N), the mean loss."""
        B, N = idx.shape
        if N > self.config.block_size:
            raise ValueError(f"idx has {N} tokens but the model was built for at most block_size={self.config.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(N, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def train(config: GPTConfig, backend: str = "flash", steps: int = 100, seed: int = 0, *, device=None,
          progress: bool = False) -> List[float]:
    """Train a fresh GPT on the copy task; return the loss of every step.

    The same ``seed`` gives the same initial weights and the same batches whatever the backend, so
    the curves of two backends differ only by floating-point rounding. ``device``: "cpu", "cuda", ...;
    None takes the GPU when there is one. ``progress`` shows a tqdm bar.
    """
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = GPT(config, backend).to(device)
    data = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    losses = []
    for _ in (bar := trange(steps, disable=not progress, desc=f"{backend}")):
        _, loss = model(*copy_batch(config, data, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
