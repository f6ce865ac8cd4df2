"""Frozen networks read from local folders: never trained, never in a checkpoint, never sharded.

A leaf package (like `nn/`): it imports nothing from `diffusion/`, `autoencoder/`, `evaluation/` or
`training/`, so every stage may use it. Today it holds the text encoders (`text.py`: one Hugging Face
text model, CLIP / T5 / BERT-family / decoder-only LM; `text_join.py`: several joined into one condition).
"""

from .text import TextEncoder, TextEncoderConfig, TextEncoderError, default_text_encoder_path
from .text_join import TextEmbedding, TextEncoders

__all__ = ["TextEmbedding", "TextEncoder", "TextEncoderConfig", "TextEncoderError", "TextEncoders",
           "default_text_encoder_path"]
