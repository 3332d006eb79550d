"""Cubic-Newton problems and their step-indexed sample streams."""

import pytest
import torch

from datamodules.cubic_problems import (
    LogisticToyDataModule,
    MLPClassifier,
    SaddleNoiseDataModule,
    make_logistic_data,
    step_generator,
)


def _take(stream, k):
    it = iter(stream)
    return [next(it) for _ in range(k)]


def test_synthetic_data_follows_the_spec():
    A, y = make_logistic_data(n=500, d=30, w_scale=3.0, label_noise=0.3, seed=0)
    assert A.shape == (500, 30) and A.dtype == torch.float64
    assert torch.allclose(A.norm(dim=1), torch.ones(500, dtype=torch.float64))
    assert set(y.tolist()) == {-1.0, 1.0}
    A2, y2 = make_logistic_data(n=500, d=30, seed=0)
    assert torch.equal(A, A2) and torch.equal(y, y2)
    assert not torch.equal(A, make_logistic_data(n=500, d=30, seed=1)[0])


def test_breast_cancer_source_is_bundled_with_scikit_learn():
    A, y = make_logistic_data(source="breast_cancer")
    assert A.shape == (569, 30)
    assert set(y.tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="source must be"):
        make_logistic_data(source="mnist")


def test_stream_is_a_function_of_the_step_index():
    dm = LogisticToyDataModule(n=100, d=5, seed=3)
    full = _take(dm.stream(rank=0, start_step=0), 6)
    tail = _take(dm.stream(rank=0, start_step=4), 2)
    for (g1, h1), (g2, h2) in zip(full[4:], tail, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g1 + h1, g2 + h2, strict=True))
    other_rank = _take(dm.stream(rank=1), 1)[0]
    assert not torch.equal(other_rank[0][0], full[0][0][0])
    assert step_generator(0, 0, 1).initial_seed() != step_generator(0, 0, 2).initial_seed()


def test_independent_and_shared_hessian_batches():
    dm = LogisticToyDataModule(n=1000, d=5, batch_size_grad=4, batch_size_hess=2, seed=0)
    (ag, _), (ah, _) = _take(dm.stream(), 1)[0]
    assert ag.shape == (4, 5) and ah.shape == (2, 5)
    assert not torch.equal(ag[:2], ah)
    shared = LogisticToyDataModule(
        n=1000, d=5, batch_size_grad=4, batch_size_hess=2, independent_hessian_batch=False
    )
    (ag, _), (ah, _) = _take(shared.stream(), 1)[0]
    assert torch.equal(ag[:2], ah)
    with pytest.raises(ValueError, match="batch_size_hess"):
        LogisticToyDataModule(batch_size_grad=1, batch_size_hess=2, independent_hessian_batch=False)
    with pytest.raises(ValueError, match="batch_size_grad must be >= 1"):
        LogisticToyDataModule(batch_size_grad=0)
    with pytest.raises(ValueError, match="val_batch_size must be >= 1 or null"):
        LogisticToyDataModule(n=10, d=2, val_batch_size=-1)  # ran no validation batch at all
    for n, d in ((0, 5), (5, 0)):
        with pytest.raises(ValueError, match=f"n >= 1 and d >= 1, got n={n}, d={d}"):
            LogisticToyDataModule(n=n, d=d)


def test_full_batch_mode_and_validation_loader():
    dm = LogisticToyDataModule(n=50, d=3, full_batch=True, val_batch_size=20)
    (ag, _), (ah, _) = _take(dm.stream(), 1)[0]
    assert torch.equal(ag, dm.A) and torch.equal(ah, dm.A)
    sizes = [len(b[0]) for b in dm.val_dataloader()]
    assert sizes == [20, 20, 10]


def test_saddle_noise_stream():
    dm = SaddleNoiseDataModule(noise=0.5, batch_size_grad=1000, seed=0)
    (xi,), _ = _take(dm.stream(), 1)[0]
    assert xi.shape == (1000, 2)
    assert 0.45 < float(xi.std()) < 0.55
    (val,) = next(iter(dm.val_dataloader()))
    assert torch.equal(val, torch.zeros(1, 2, dtype=torch.float64))


def test_mlp_classifier_is_seeded():
    a = torch.randn(4, 7, dtype=torch.float64)
    assert torch.equal(MLPClassifier(7, 5, seed=1)(a), MLPClassifier(7, 5, seed=1)(a))
    assert MLPClassifier(7, 5)(a).shape == (4,)


def test_step_indices_reproduce_the_stream():
    dm = LogisticToyDataModule(n=100, d=4, batch_size_grad=3, batch_size_hess=2, seed=5)
    for (ig, ih), ((ag, _), (ah, yh)) in zip(
        dm.step_indices(5), _take(dm.stream(), 5), strict=True
    ):
        assert torch.equal(dm.A[ig], ag) and torch.equal(dm.y[ih], yh) and torch.equal(dm.A[ih], ah)
