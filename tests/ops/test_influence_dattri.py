"""Cross-check against dattri (optional extra: `pip install dattri==0.3.0 --no-deps`), spec V3.

dattri returns ``S[i, j] = g_i^T H^{-1} g_test_j``; ours is ``IF_i = - v^T H^{-1} g_i`` with ``v``
the mean test gradient, so ``IF = - mean_j S[:, j]``, checked exactly on the identity transform
(grad_dot) and on DataInf with a fixed damping (same formula, same per-module partition).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("dattri")

from modules.sequence_classifier import LoRAClassifier
from ops.influence_config import DampingConfig, GradConfig
from ops.influence_engine import InfluenceEngine
from ops.per_sample_grads import select_params


def test_grad_dot_and_datainf_match_dattri() -> None:
    from dattri.algorithm.base import BaseInnerProductAttributor
    from dattri.algorithm.influence_function import IFAttributorDataInf
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    model = LoRAClassifier(in_features=6, hidden_size=12, num_classes=3, lora_r=2, init_seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=gen)
    model = model.eval()  # float32: dattri accumulates its scores in float32
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,))
    tr, te = slice(0, 40), slice(40, 50)
    lam = 1e-2
    engine = InfluenceEngine(
        ["grad_dot", "datainf"],
        damping=DampingConfig(mode="fixed", value=lam),
        grads=GradConfig(dtype="float64"),
    )
    ours = engine.run(
        model,
        select_params(model, ["lora_A", "lora_B", "head.weight"]),
        model.per_sample_loss,
        lambda: [(torch.arange(40), {"x": x[tr], "y": y[tr]})],
        lambda: [(torch.arange(10), {"x": x[te], "y": y[te]})],
    ).scores

    def loss_func(params, data):
        xb, yb = data
        logits = torch.func.functional_call(model, params, (xb,))
        return torch.nn.functional.cross_entropy(logits, yb.long())

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=state)
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=20)
    test = DataLoader(TensorDataset(x[te], y[te]), batch_size=10)
    for ours_name, attr in (
        ("grad_dot", BaseInnerProductAttributor(task=task)),
        ("datainf", IFAttributorDataInf(task=task, regularization=lam)),
    ):
        attr.cache(train)
        theirs = -attr.attribute(train, test).mean(1)
        torch.testing.assert_close(ours[ours_name], theirs.double(), rtol=1e-4, atol=1e-6)
