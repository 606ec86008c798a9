"""Embedding: images -> pooled backbone features (decode, preprocess, backbones,
export, the plan resolved once by the launcher, the Beam stage, reuse)."""
