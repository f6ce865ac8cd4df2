"""Frozen networks read from local files: never trained by the model that uses them, never in its checkpoint,
never sharded.

A leaf package (like `nn/`): it imports nothing from `diffusion/`, `autoencoder/`, `evaluation/` or
`training/`, so every stage may use it. Only `mnist_data.py` reads `data/mnist.py` (the raw MNIST arrays);
`data/` imports nothing from here.

- `text.py`, `text_join.py`: the text encoders (one Hugging Face text model, CLIP / T5 / BERT-family /
  decoder-only LM; several joined into one condition).
- `dinov2.py`: the one DINOv2 wrapper (patch grid or CLS token, ImageNet normalisation, a local folder only)
  behind the RAE encoder, REPA's target and the FD-DINOv2 extractor.
- `mnist_classifier.py` (+ `_training`, `_cache`, `mnist_data.py`): the project-trained MNIST CNN, the
  measuring instrument of class accuracy and MNIST-FID, and REPA's small in-domain target.
"""

from .dinov2 import DINOv2
from .text import TextEncoder, TextEncoderConfig, TextEncoderError, default_text_encoder_path
from .text_join import TextEmbedding, TextEncoders

__all__ = ["DINOv2", "TextEmbedding", "TextEncoder", "TextEncoderConfig", "TextEncoderError", "TextEncoders",
           "default_text_encoder_path"]
