"""Vector quantisation (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937; VQGAN, Esser et al. 2021).

Options, each behind its own flag:
- `l2_normalize`: look codes up by cosine similarity on unit vectors (ViT-VQGAN, Yu et al. 2022,
  arXiv 2110.04627) — improves codebook usage.
- `ema`: codebook updated by exponential moving averages of assigned encodings instead of by the
  codebook loss (VQ-VAE appendix A.1; Razavi et al. 2019). The codebook then gets no gradient.
- `heads`: multichannel quantisation (MoVQ, Zheng et al. 2022, arXiv 2209.09002): the D latent channels
  are split into `heads` groups of D/heads, each looked up in the same codebook of D/heads-dim codes,
  so one spatial position holds `heads` codes (K^heads combinations for the price of K codes).
- `restart_threshold`: codes whose EMA assignment count falls below it are re-initialised from
  random encodings of the current batch (dead-code restart, Dhariwal et al. 2020 "Jukebox";
  Zeghidour et al. 2021 "SoundStream"). The first training step therefore initialises the whole
  codebook from data.
Under DDP the statistics are summed over ranks and rank 0's restart choice is broadcast, so all
replicas keep identical codebooks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, l2_normalize: bool = False,
                 ema: bool = False, ema_decay: float = 0.99, restart_threshold: float = 0.0,
                 usage_decay: float = 0.99, heads: int = 1):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"autoencoder.vq_heads={heads} must be >= 1 and divide the latent width {dim}")
        # `dim` is the width of one code: the latent's channels are `heads` codes side by side.
        self.codebook_size, self.dim, self.beta, self.heads = codebook_size, dim // heads, beta, heads
        self.l2_normalize, self.use_ema, self.ema_decay = l2_normalize, ema, ema_decay
        self.restart_threshold, self.usage_decay = restart_threshold, usage_decay
        # `embedding.weight` is taming-transformers' name (`quantize.embedding.weight`).
        self.embedding = nn.Embedding(codebook_size, self.dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.zeros(codebook_size))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        self.register_buffer("code_usage", torch.zeros(codebook_size))

    def codebook(self) -> torch.Tensor:
        e = self.embedding.weight.float()                        # (K, D)
        return F.normalize(e, dim=1) if self.l2_normalize else e

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, heads*d, h, w) -> (B*heads, d, h, w): each head a separate latent for the shared codebook."""
        if self.heads == 1:
            return z
        B, _, h, w = z.shape
        return z.reshape(B * self.heads, self.dim, h, w)

    def _merge(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `_split`: (B*heads, d, h, w) -> (B, heads*d, h, w)."""
        if self.heads == 1:
            return z
        return z.reshape(z.shape[0] // self.heads, self.heads * self.dim, *z.shape[2:])

    def _idx_out(self, idx: torch.Tensor) -> torch.Tensor:
        # (B*heads, h, w) -> (B, h, w) for one head, (B, heads, h, w) for several.
        return idx if self.heads == 1 else idx.reshape(-1, self.heads, *idx.shape[1:])

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices for z (B, D, h, w) -> (B, h, w), or (B, heads, h, w) with several heads."""
        return self._idx_out(self._lookup(self._split(z)))

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> its nearest codes (B, D, h, w), no gradient path: how a decoder reads latents
        that a diffusion model produced off the codebook (LDM's VQModelInterface quantises in decode)."""
        return self.embed(self.lookup(z)).to(z.dtype)

    def _lookup(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, d)
        if self.l2_normalize:
            flat = F.normalize(flat, dim=1)
        e = self.codebook()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 ; computed in fp32 (bf16 ties would flip codes).
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # (N, K)
        return d.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) (or (B, heads, h, w)) -> codes (B, D, h, w)."""
        if self.heads > 1:
            idx = idx.flatten(0, 1)                              # (B*heads, h, w)
        return self._merge(self._embed(idx))

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.codebook()).permute(0, 3, 1, 2).contiguous()  # (N, d, h, w)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None):
        """Returns (z_q with straight-through gradient, vq loss, stats) for z (B, D, h, w)."""
        zf = self._split(z.float())                              # (B*heads, d, h, w)
        if self.l2_normalize:
            zf = F.normalize(zf, dim=1)
        idx = self._lookup(zf)                                   # (B*heads, h, w)
        counts = torch.bincount(idx.flatten(), minlength=self.codebook_size).float()  # (K,)
        if self.training:
            self._update(zf, idx, counts, generator)
        zq = self._embed(idx)                                    # (B*heads, d, h, w), post-update codebook
        commit = F.mse_loss(zf, zq.detach())
        loss = self.beta * commit if self.use_ema else F.mse_loss(zq, zf.detach()) + self.beta * commit
        zq = self._merge(zf + (zq - zf).detach())                # straight-through estimator, (B, D, h, w)
        p = counts / counts.sum()
        stats = {"perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()),
                 "usage": (counts > 0).float().mean(), "indices": self._idx_out(idx)}
        return zq.to(z.dtype), loss, stats

    @torch.no_grad()
    def _update(self, zf: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor, generator) -> None:
        flat = zf.permute(0, 2, 3, 1).reshape(-1, self.dim)      # (N, D)
        counts = _all_reduce_sum(counts.clone())
        if self.use_ema:
            onehot_sum = torch.zeros_like(self.embed_sum).index_add_(0, idx.flatten(), flat)  # (K, D)
            onehot_sum = _all_reduce_sum(onehot_sum)
            self.cluster_size.lerp_(counts, 1 - self.ema_decay)
            self.embed_sum.lerp_(onehot_sum, 1 - self.ema_decay)
            # Laplace smoothing keeps unused codes from dividing by zero (Razavi et al. 2019).
            n = self.cluster_size.sum()
            size = (self.cluster_size + 1e-5) / (n + self.codebook_size * 1e-5) * n
            self.embedding.weight.copy_(self.embed_sum / size[:, None])
        self.code_usage.lerp_(counts, 1 - self.usage_decay)
        if self.restart_threshold > 0:
            dead = self.code_usage < self.restart_threshold     # (K,)
            n_dead = int(dead.sum())
            if n_dead:
                pick = torch.randint(flat.shape[0], (n_dead,), generator=generator, device=flat.device)
                new = flat[pick].to(self.embedding.weight.dtype)  # (n_dead, D)
                if _distributed():
                    dist.broadcast(new, src=0)
                self.embedding.weight[dead] = new
                if self.use_ema:
                    self.embed_sum[dead] = new
                    self.cluster_size[dead] = 1.0
                # A grace period of ~ln(2)/(1-usage_decay) steps before a fresh code can die again.
                self.code_usage[dead] = 2 * self.restart_threshold
