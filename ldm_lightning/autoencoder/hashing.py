"""`autoencoder_hash`: the identity of a frozen autoencoder, independent of the file format it came from.

Latent shards record it and stage 2 refuses latents made by another autoencoder; it lives with the
autoencoder (its config and state dict are what it hashes), so stage 2 imports it from here.
"""

from __future__ import annotations

import hashlib
import json

import torch


def autoencoder_hash(ae) -> str:
    """sha256 of an autoencoder's config and weights (names, dtypes, shapes, bytes; sorted by name)."""
    h = hashlib.sha256()
    h.update(json.dumps(ae.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(ae.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
