"""Cross-check against dattri (optional extra: `pip install dattri==0.3.0 --no-deps`), spec V3.

dattri returns ``S[i, j] = g_i^T H^{-1} g_test_j``; ours is ``IF_i = - v^T H^{-1} g_i`` with ``v``
the mean test gradient, so ``IF = - mean_j S[:, j]``, checked exactly on the identity transform
(grad_dot), on DataInf with a fixed damping (same formula, same per-module partition), and on the
true-Hessian baselines: our layer-wise ``exact_hessian``/``lissa_hessian`` against dattri's
Explicit/LiSSA run once per tensor (``layer_name``; dattri inverts the joint Hessian of the
tensors it is given, so the per-tensor sum is the block-diagonal inverse).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("dattri")

from modules.sequence_classifier import LoRAClassifier
from ops.influence_config import DampingConfig, GradConfig, LissaConfig
from ops.influence_engine import InfluenceEngine
from ops.per_sample_grads import select_params

LAM, DEPTH, SCALE = 1e-2, 200, 10.0


# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    gen = torch.Generator().manual_seed(0)
    model = LoRAClassifier(in_features=6, hidden_size=12, num_classes=3, lora_r=2, init_seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=gen)
    model = model.eval()  # float32: dattri accumulates its scores in float32
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    return model, (x[:40], y[:40]), (x[40:], y[40:])


def _ours(model, train, test, methods):
    engine = InfluenceEngine(
        methods,
        damping=DampingConfig(mode="fixed", value=LAM),
        lissa=LissaConfig(iters=DEPTH, scale=SCALE),
        grads=GradConfig(dtype="float64"),
    )
    return engine.run(
        model,
        select_params(model, ["lora_A", "lora_B", "head.weight"]),
        model.per_sample_loss,
        lambda: [(torch.arange(40), {"x": train[0], "y": train[1]})],
        lambda: [(torch.arange(10), {"x": test[0], "y": test[1]})],
    ).scores


def _dattri(model, train, test, make, per_tensor: bool, batch_size: int = 40) -> torch.Tensor:
    """``- mean_j S[:, j]`` of the attributor ``make(task, **layer_kw)``, summed over tensors."""
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    def loss_func(params, data):
        xb, yb = data
        logits = torch.func.functional_call(model, params, (xb,))
        return torch.nn.functional.cross_entropy(logits, yb.long())  # LiSSA casts y to float

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_loader = DataLoader(TensorDataset(*train), batch_size=batch_size)
    test_loader = DataLoader(TensorDataset(*test), batch_size=10)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = 0
    for kw in [{"layer_name": [n]} for n in names] if per_tensor else [{}]:
        # a fresh task per attributor: dattri 0.3.0's partial_param writes traced tensors back
        # into the task's parameter dict; no_grad: dattri's flattened parameters require grad,
        # so LiSSA would keep every step's graph alive (its torch.func calls ignore no_grad)
        attr = make(AttributionTask(loss_func=loss_func, model=model, checkpoints=state), **kw)
        with torch.no_grad():
            attr.cache(train_loader)
            total = total + attr.attribute(train_loader, test_loader)
    return -total.mean(1).double()


def test_grad_dot_and_datainf_match_dattri() -> None:
    from dattri.algorithm.base import BaseInnerProductAttributor
    from dattri.algorithm.influence_function import IFAttributorDataInf

    model, train, test = _setup()
    ours = _ours(model, train, test, ["grad_dot", "datainf"])
    for name, make in (
        ("grad_dot", lambda task: BaseInnerProductAttributor(task=task)),
        ("datainf", lambda task: IFAttributorDataInf(task=task, regularization=LAM)),
    ):
        # two training batches: grad_dot/DataInf do not depend on the batching
        theirs = _dattri(model, train, test, make, per_tensor=False, batch_size=20)
        torch.testing.assert_close(ours[name], theirs, rtol=1e-4, atol=1e-6)


def test_hessian_baselines_match_dattri_explicit_and_lissa() -> None:
    from dattri.algorithm.influence_function import IFAttributorExplicit, IFAttributorLiSSA

    model, train, test = _setup()
    ours = _ours(model, train, test, ["exact_hessian", "lissa_hessian", "exact_fim"])
    explicit = _dattri(
        model,
        train,
        test,
        lambda task, **kw: IFAttributorExplicit(task=task, regularization=LAM, **kw),
        per_tensor=True,
    )
    lissa = _dattri(
        model,
        train,
        test,
        # dattri: r <- v + (1 - damping) r - H r / s, output r / s, i.e. (H + s damping I)^-1 v
        # at convergence; damping = lambda / s is our recursion r <- v + r - (H r + lambda r) / s.
        # batch_size = n: randperm(n)[:n] makes every Hessian-vector product the full-batch one
        lambda task, **kw: IFAttributorLiSSA(
            task=task,
            damping=LAM / SCALE,
            scaling=SCALE,
            recursion_depth=DEPTH,
            batch_size=40,
            **kw,
        ),
        per_tensor=True,
    )
    torch.testing.assert_close(ours["exact_hessian"], explicit, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["lissa_hessian"], lissa, rtol=1e-4, atol=1e-6)
    # the Fisher baseline is a different curvature: it must not pass the same check
    assert not torch.allclose(ours["exact_fim"], explicit, rtol=1e-2, atol=1e-4)
