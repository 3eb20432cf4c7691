"""DMJD pretraining: disjoint multi-view masking, HOG targets, joint visible distillation."""

from .hog import HOGTargets
from .model import DMJD

__all__ = ["DMJD", "HOGTargets"]
