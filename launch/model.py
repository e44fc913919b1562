"""A compact LLaMA-style decoder and a seeded synthetic language, for launch/bench.py.

Model: token embedding, ``n_layers`` pre-norm blocks (RMSNorm, causal self-attention with
rotary position embeddings, RMSNorm, SwiGLU MLP), a final RMSNorm and an untied output
projection. No bias anywhere, as in LLaMA.

Size presets follow the LLaMA configurations the C-AdamW paper trained (60M-1B, the
GaLore/ReLoRA family): e.g. 60M = hidden 512, intermediate 1376, 8 layers, 8 heads;
1B = hidden 2048, intermediate 5461, 24 layers, 32 heads; vocabulary 32000, sequence 256.
``tiny`` is for CPU smoke runs and CI.

Data: :class:`MarkovLanguage`, a random sparse first-order Markov chain over the vocabulary
(each token has ``branching`` possible successors with random probabilities). It needs no
download, is learnable (the loss falls from ``log V`` towards the chain's entropy rate,
reported as :attr:`MarkovLanguage.entropy`), and batch ``step`` of the *global* batch is a
pure function of ``(seed, step)``, so every world size and engine sees the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    seq_len: int
    batch: int  # default micro-batch per rank

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, ModelConfig] = {
    # CPU smoke runs / CI: 0.13M parameters, 21 tensors.
    "tiny": ModelConfig(
        vocab=256, hidden=64, intermediate=176, layers=2, heads=4, seq_len=64, batch=8
    ),
    # The paper's shapes (GaLore / ReLoRA LLaMA configs).
    "60m": ModelConfig(
        vocab=32000, hidden=512, intermediate=1376, layers=8, heads=8, seq_len=256, batch=16
    ),
    "130m": ModelConfig(
        vocab=32000, hidden=768, intermediate=2048, layers=12, heads=12, seq_len=256, batch=16
    ),
    "350m": ModelConfig(
        vocab=32000, hidden=1024, intermediate=2736, layers=24, heads=16, seq_len=256, batch=16
    ),
    "1b": ModelConfig(
        vocab=32000, hidden=2048, intermediate=5461, layers=24, heads=32, seq_len=256, batch=8
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # (T, D/2)
    return ang.cos(), ang.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, D); rotate pairs (x[..., :D/2], x[..., D/2:]) (the GPT-NeoX / HF layout)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos = cos[: x.shape[-2]].to(x.dtype)
    sin = sin[: x.shape[-2]].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        h = cfg.hidden
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, h = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(split(self.q_proj(x)), cos, sin)
        k = apply_rotary(split(self.k_proj(x)), cos, sin)
        v = split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class Llama(nn.Module):
    """LLaMA-style causal decoder; ``forward(tokens) -> logits`` and ``loss(tokens)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)  # untied
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim)
        # Not parameters: FSDP2 / DeepSpeed leave non-persistent buffers alone.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.layers))  # GPT-2 style residual scaling
            else:
                p.normal_(0.0, std)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.lm_head(self.norm(x))


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, tensors) of :class:`Llama` for ``cfg``, without building it."""
    h, i = cfg.hidden, cfg.intermediate
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return 2 * cfg.vocab * h + cfg.layers * per_layer + h, 9 * cfg.layers + 3


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Llama:
    """The same initial weights for every engine and world size: built from ``seed`` on CPU."""
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Llama(cfg)
    finally:
        torch.random.set_rng_state(g_state)
    return model.to(device)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, as LLaMA recipes do: weight decay on matrices, none on norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class MarkovLanguage:
    """A seeded random sparse Markov chain over ``vocab`` tokens.

    Every token has ``branching`` successors drawn uniformly, with Dirichlet(1) weights.
    ``batch(step, rows)`` returns ``rows`` sequences of ``seq_len + 1`` tokens (inputs and
    shifted targets); it depends only on ``(seed, step)``.
    """

    def __init__(self, vocab: int, seq_len: int, seed: int, branching: int = 4) -> None:
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed
        g = torch.Generator().manual_seed(seed * 7919 + 17)
        self.successors = torch.randint(0, vocab, (vocab, branching), generator=g)
        w = -torch.log(torch.rand(vocab, branching, generator=g, dtype=torch.float64))
        probs = w / w.sum(1, keepdim=True)
        self.cum = probs.cumsum(1).to(torch.float64)
        self.cum[:, -1] = 1.0 + 1e-9
        # Entropy rate under the stationary distribution (power iteration on the sparse chain).
        pi = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        for _ in range(200):
            nxt = torch.zeros(vocab, dtype=torch.float64)
            nxt.index_add_(0, self.successors.reshape(-1), (pi[:, None] * probs).reshape(-1))
            pi = nxt
        # Duplicate successors merge their probabilities; compute entropy per row exactly.
        ent = torch.zeros(vocab, dtype=torch.float64)
        for v in range(vocab) if vocab <= 4096 else ():
            _, inv = torch.unique(self.successors[v], return_inverse=True)
            merged = torch.zeros(branching, dtype=torch.float64).index_add_(0, inv, probs[v])
            merged = merged[merged > 0]
            ent[v] = -(merged * merged.log()).sum()
        if vocab > 4096:  # duplicates are rare for large vocabularies
            ent = -(probs * probs.log()).sum(1)
        self.entropy = float((pi * ent).sum())

    def batch(self, step: int, rows: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))
        out = torch.empty(rows, self.seq_len + 1, dtype=torch.int64)
        cur = torch.randint(0, self.vocab, (rows,), generator=g)
        u = torch.rand(self.seq_len, rows, 1, generator=g, dtype=torch.float64)
        out[:, 0] = cur
        for t in range(self.seq_len):
            idx = torch.searchsorted(self.cum[cur], u[t]).squeeze(1)
            cur = self.successors[cur, idx]
            out[:, t + 1] = cur
        return out
