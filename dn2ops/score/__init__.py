"""Scoring: images and sets against an index, the estimator, set features."""
