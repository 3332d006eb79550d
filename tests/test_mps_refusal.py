"""Parts that compute in float64 refuse the MPS backend (Apple GPUs, which have no float64) at
set-up, naming the setting, instead of failing at their first float64 tensor."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from callbacks.hyperinf import HyperINFCallback
from callbacks.warmup_diagnostics import UpdateDiagnostics
from datamodules.cubic_problems import SaddleFunction
from modules.cubic_newton import CubicNewtonModule
from modules.lora_fl import FederatedLoRAModule
from modules.meta_learning import MetaLearningModule
from modules.precision import refuse_float64_on_mps
from ops.influence_config import GradConfig

MPS = torch.device("mps")  # a device descriptor only: nothing is allocated on it


def _on_mps():
    return SimpleNamespace(strategy=SimpleNamespace(root_device=MPS))


def test_the_helper_refuses_only_mps():
    for device in ("cpu", "cuda", "meta"):
        refuse_float64_on_mps(torch.device(device), "Part", "solves")
    with pytest.raises(ValueError, match=r"Part solves in float64.*--trainer.accelerator=cpu"):
        refuse_float64_on_mps(MPS, "Part", "solves")


@pytest.mark.parametrize(
    "build",
    [
        lambda: CubicNewtonModule(SaddleFunction()),
        lambda: MetaLearningModule(nn.Linear(2, 1), loss="half_mse"),
        lambda: FederatedLoRAModule(vocab_size=32),
    ],
    ids=["cubic_newton", "meta_learning", "lora_fl"],
)
def test_float64_modules_refuse_mps_in_setup(build):
    module = build()
    module._trainer = _on_mps()
    with pytest.raises(ValueError, match=rf"{type(module).__name__} .* MPS backend"):
        module.setup("fit")


def test_update_diagnostics_refuse_mps():
    with pytest.raises(ValueError, match="UpdateDiagnostics measures norms and angles in float64"):
        UpdateDiagnostics().setup(_on_mps(), nn.Linear(2, 1), "fit")


def test_hyperinf_refuses_mps_only_for_float64_work():
    """Its default methods run in float32; an exact solve or float64 gradients do not."""
    for kwargs in ({"methods": ["exact_gfim"]}, {"grads": GradConfig(dtype="float64")}):
        with pytest.raises(ValueError, match=r"HyperINFCallback computes .* MPS backend"):
            HyperINFCallback(**kwargs).check_inputs(_on_mps(), nn.Linear(2, 1))
    # Past the device check, the default fails on the next one (no per-sample loss here).
    with pytest.raises(TypeError, match="per_sample_loss"):
        HyperINFCallback().check_inputs(_on_mps(), nn.Linear(2, 1))
