"""Embedding: images -> pooled backbone features (decode, preprocess, backbones,
export, the Beam stage, reuse)."""
