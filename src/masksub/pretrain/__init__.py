"""DMJD pretraining: disjoint multi-view masking with HOG targets (building blocks so far)."""

from .hog import HOGTargets

__all__ = ["HOGTargets"]
