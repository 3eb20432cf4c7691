"""masksub: masked sub-branch self-distillation for any timm model (and Hugging Face text models), in one line.

model = masksub.wrap(timm.create_model("deit3_small_patch16_224"), sub="mask", ratio=0.5)
step = masksub.Step(model, optimizer, criterion)
for x, y in loader:
    metrics = step(x, y)
"""

from . import models  # noqa: F401  (registers convvit_* with timm)
from .adapters import MaskAdapter, list_adapters, register_adapter, resolve_adapter
from .loss import SubBranchLoss
from .masking import num_keep, num_masked
from .step import Step
from .wrapper import SubBranchModel, wrap

__version__ = "0.1.0"

__all__ = [
    "MaskAdapter",
    "Step",
    "SubBranchLoss",
    "SubBranchModel",
    "list_adapters",
    "num_keep",
    "num_masked",
    "register_adapter",
    "resolve_adapter",
    "wrap",
]
