"""``masksub export --onnx``: the exported model also as ``model.onnx`` (input ``pixel_values``, output ``logits``, or
``features`` for a backbone; any batch size), written by timm's ONNX exporter and checked with ONNX Runtime against the
PyTorch model."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import timm
import torch

from .build import timm_at_least
from .config import ConfigError

NEEDS = ("onnx", "onnxscript", "onnxruntime")
# Before it, timm's exporter keys the dynamic batch axis by its default input name: a named input (pixel_values) gets
# a fixed batch size; and it calls torch.onnx.dynamo_export, which torch 2.9 removed.
MIN_TIMM = "1.0.31"


def check_installed() -> None:
    if missing := [name for name in NEEDS if importlib.util.find_spec(name) is None]:
        raise ConfigError(
            f'--onnx needs {", ".join(missing)}: pip install onnx onnxscript onnxruntime (or "masksub[onnx]")'
        )
    if not timm_at_least(MIN_TIMM):
        raise ConfigError(
            f"--onnx needs timm >= {MIN_TIMM}, whose ONNX exporter keeps the batch size free (timm "
            f"{timm.__version__}'s fixes it to the traced batch): pip install -U 'timm>={MIN_TIMM}', or drop --onnx"
        )


def write_onnx(model: torch.nn.Module, file: Path, input_size: tuple[int, int, int], output: str = "logits") -> str:
    """Write ``model`` (in evaluation mode) to ``file`` with a dynamic batch axis and its output named ``output``;
    the exporter that made it: torch.export's (dynamo), else TorchScript's where it fails. Checked on a batch of
    another size than the one traced: ONNX Runtime must give PyTorch's outputs."""
    from timm.utils.onnx import onnx_export

    trace = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    errors = []
    for dynamo in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracers' notes on Python branches: the check below decides
                onnx_export(model, str(file), example_input=trace, use_dynamo=dynamo, check=True,
                            input_names=["pixel_values"], output_names=[output])  # fmt: skip
        except Exception as e:  # an operator or a Python branch one exporter cannot take
            errors.append(f"{'dynamo' if dynamo else 'TorchScript'}: {type(e).__name__}: {str(e)[:200]}")
            file.unlink(missing_ok=True)
            continue
        _check(model, file, input_size, output)
        return "torch.export (dynamo)" if dynamo else "TorchScript"
    raise ConfigError(f"neither ONNX exporter can write {type(model).__name__}: " + "; ".join(errors))


def _check(model: torch.nn.Module, file: Path, input_size: tuple[int, int, int], output: str) -> None:
    import onnxruntime

    x = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    try:
        got = session.run([output], {"pixel_values": x.numpy()})[0]
    except Exception as e:  # a fixed batch size, an operator ONNX Runtime lacks
        raise ConfigError(
            f"ONNX Runtime cannot run the ONNX model on a batch of 3 ({type(e).__name__}: {str(e)[:300]}); "
            "nothing was written"
        ) from None
    with torch.no_grad():
        want = model(x).numpy()
    scale = max(1.0, float(np.abs(want).max()))
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4 * scale):
        worst = float(np.abs(got - want).max()) if got.shape == want.shape else f"shape {got.shape}"
        raise ConfigError(
            f"the ONNX model computes other {output} than the PyTorch model on a batch of 3 (largest difference "
            f"{worst}); nothing was written"
        )
