"""Cross-check of our influence baselines against dattri (independent implementation, spec V3).

On the spec's V2 model (``LoRAClassifier``: frozen random layer + peft LoRA r=4 + head, trained
full-batch to memorise 20% flipped labels) and the same data, compare per training example:

* our ``grad_dot`` with dattri's plain inner-product attributor (identity transform);
* our ``datainf`` (``damping.mode=fixed``) with ``IFAttributorDataInf(regularization=lambda)``;
* our ``exact_fim`` (Fisher) with ``IFAttributorExplicit`` (true Hessian: a different curvature,
  so only rank agreement is expected);
* our ``lissa`` (Fisher) with ``IFAttributorLiSSA`` (stochastic true-Hessian products).

dattri returns ``S[i, j] = g_i^T H^{-1} g_test_j`` (positive = helpful); our score is
``IF_i = - v^T H^{-1} g_i`` with ``v`` the mean test gradient, so ``IF = - mean_j S[:, j]``. This
identity is checked exactly on ``grad_dot`` before any other comparison. dattri only sees
trainable parameters, grouped per module (``lora_A``, ``lora_B``, ``head``), the same partition
as ours.

    pip install dattri==0.3.0 --no-deps        # its other deps (numpy, scipy, tqdm, pyyaml) are here
    python benchmarks/hyperinf_dattri.py [--seeds 3]

Writes ``docs/results/benchmarks/hyperinf_dattri.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.noisy_labels import NoisyLabelDataModule  # noqa: E402
from modules.sequence_classifier import LoRAClassifier  # noqa: E402
from ops.influence_config import DampingConfig, GradConfig, LissaConfig  # noqa: E402
from ops.influence_engine import InfluenceEngine  # noqa: E402
from ops.influence_metrics import roc_auc  # noqa: E402
from ops.per_sample_grads import select_params  # noqa: E402

LISSA_DEPTH = 300
PAIRS = {  # ours -> dattri attributor
    "grad_dot": "inner_product",
    "datainf": "IFAttributorDataInf",
    "exact_fim": "IFAttributorExplicit",
    "lissa": "IFAttributorLiSSA",
}


def train(seed: int, n_train: int, n_val: int, epochs: int):
    dm = NoisyLabelDataModule(n_train=n_train, n_val=n_val, separation=2.0, seed=seed)
    dm.setup("fit")
    model = LoRAClassifier(init_seed=seed)
    opt = model.configure_optimizers()
    batch = {"x": dm.train_dataset.x, "y": dm.train_dataset.y}
    for _ in range(epochs):
        opt.zero_grad()
        model.per_sample_loss(batch).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return dm, model.eval()


def ours(dm, model, lam: float) -> dict[str, torch.Tensor]:
    engine = InfluenceEngine(
        list(PAIRS),
        damping=DampingConfig(mode="fixed", value=lam),
        lissa=LissaConfig(iters=200),
        grads=GradConfig(dtype="float64"),
    )
    tr, va = dm.train_dataset, dm.val_dataset
    res = engine.run(
        model.double(),
        select_params(model, ["lora_A", "lora_B", "head.weight"]),
        model.per_sample_loss,
        lambda: [(torch.arange(len(tr)), {"x": tr.x.double(), "y": tr.y})],
        lambda: [(torch.arange(len(va)), {"x": va.x.double(), "y": va.y})],
    )
    model.float()
    return res.scores


def theirs(dm, model, lam: float) -> dict[str, torch.Tensor]:
    from dattri.algorithm.base import BaseInnerProductAttributor
    from dattri.algorithm.influence_function import (
        IFAttributorDataInf,
        IFAttributorExplicit,
        IFAttributorLiSSA,
    )
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    def loss_func(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(logits, y.long())  # dattri LiSSA casts to float

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=state)
    tr, va = dm.train_dataset, dm.val_dataset
    # one training batch: dattri re-solves the test transformation for every training batch
    train_loader = DataLoader(TensorDataset(tr.x, tr.y), batch_size=len(tr), shuffle=False)
    test_loader = DataLoader(TensorDataset(va.x, va.y), batch_size=100, shuffle=False)
    attributors = {
        "inner_product": BaseInnerProductAttributor(task=task),
        "IFAttributorDataInf": IFAttributorDataInf(task=task, regularization=lam),
        "IFAttributorExplicit": IFAttributorExplicit(task=task, regularization=lam),
        "IFAttributorLiSSA": IFAttributorLiSSA(
            task=task, damping=lam, scaling=50.0, recursion_depth=LISSA_DEPTH, batch_size=50
        ),
    }
    out = {}
    for name, attr in attributors.items():
        t0 = time.perf_counter()
        attr.cache(train_loader)
        S = attr.attribute(train_loader, test_loader)  # (n_train, n_test)
        out[name] = -S.detach().mean(1)  # IF = - mean over test columns
        print(f"  dattri {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--out", default=str(ROOT / "docs/results/benchmarks/hyperinf_dattri.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import dattri
        from dattri.metric import mislabel_detection_auc
    except ImportError as err:
        sys.exit(f"dattri is not installed ({err}); pip install dattri==0.3.0 --no-deps")
    from scipy.stats import spearmanr

    rows = []
    for seed in range(args.seeds):
        dm, model = train(seed, args.n_train, args.n_val, args.epochs)
        t0 = time.perf_counter()
        a = ours(dm, model, args.damping)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = theirs(dm, model, args.damping)
        t2 = time.perf_counter()
        noisy = dm.noisy_mask
        for m, d in PAIRS.items():
            x, y = a[m].double(), b[d].double()
            rows.append(
                {
                    "seed": seed,
                    "ours": m,
                    "dattri": d,
                    "spearman": float(spearmanr(x.numpy(), y.numpy())[0]),
                    "max_rel_diff": float((x - y).abs().max() / y.abs().max()),
                    "auc_ours": roc_auc(x, noisy),
                    "auc_dattri": roc_auc(y, noisy),
                    "auc_dattri_metric_on_dattri": float(mislabel_detection_auc(y, noisy)[0]),
                }
            )
        rows.append({"seed": seed, "ours_s": t1 - t0, "dattri_s": t2 - t1})
    print(f"dattri {dattri.__version__ if hasattr(dattri, '__version__') else '0.3.0'}")
    print("| seed | ours | dattri | Spearman | max rel diff | AUC ours | AUC dattri |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "ours" in r:
            print(
                f"| {r['seed']} | {r['ours']} | {r['dattri']} | {r['spearman']:.5f} | "
                f"{r['max_rel_diff']:.2e} | {r['auc_ours']:.3f} | {r['auc_dattri']:.3f} |"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
