"""Cross-check of our influence baselines against dattri (independent implementation, spec V3).

On the spec's V2 model (``LoRAClassifier``: frozen random layer + peft LoRA r=4 + head, trained
full-batch to memorise 20% flipped labels) and the same data, compare per training example, like
with like (same curvature, same damping, same partition):

* our ``grad_dot`` with dattri's plain inner-product attributor (identity transform);
* our ``datainf`` (``damping.mode=fixed``) with ``IFAttributorDataInf(regularization=lambda)``;
* our ``exact_hessian`` with ``IFAttributorExplicit(regularization=lambda)``: both invert the true
  Hessian of the mean training loss plus ``lambda I``;
* our ``lissa_hessian`` with ``IFAttributorLiSSA``: same recursion depth ``T`` and scale ``s``,
  ``damping = lambda / s`` (dattri's recursion is ``r <- v + (1 - damping) r - H r / s``, ours
  ``r <- v + r - (H r + lambda r) / s``: identical for that value) and ``batch_size = n`` so every
  Hessian-vector product is the full-batch one (dattri's default samples one example per step).

Our curvature is layer-wise (one block per tensor, spec 3.1); dattri's Explicit/LiSSA invert the
joint Hessian of the parameters they are given, so they run once per tensor (``layer_name``) and
the per-tensor scores are summed, which is the block-diagonal inverse. Two more rows are reported
for information only: the Fisher baselines ``exact_fim``/``lissa`` against dattri's Hessian
(different curvatures) and ``exact_hessian`` against dattri's joint (all-tensor) Explicit inverse.

dattri returns ``S[i, j] = g_i^T H^{-1} g_test_j`` (positive = helpful); our score is
``IF_i = - v^T H^{-1} g_i`` with ``v`` the mean test gradient, so ``IF = - mean_j S[:, j]``. This
identity is checked exactly on ``grad_dot`` before any other comparison. dattri only sees
trainable parameters; DataInf groups them per module (``lora_A``, ``lora_B``, ``head``), the
same partition as ours.

    pip install dattri==0.3.0 --no-deps        # its other deps (numpy, scipy, tqdm, pyyaml) are here
    python benchmarks/hyperinf_dattri.py [--seeds 3]

Writes ``docs/results/benchmarks/hyperinf_dattri.json``.
"""

from __future__ import annotations

import argparse
import itertools
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
from ops.per_sample_grads import per_sample_grads, select_params  # noqa: E402

LISSA_DEPTH = 300  # T, both sides
LISSA_SCALE = 50.0  # s, both sides (dattri's default)
PAIRS = [  # (ours, dattri attributor, same method?)
    ("grad_dot", "inner_product", True),
    ("datainf", "IFAttributorDataInf", True),
    ("exact_hessian", "IFAttributorExplicit", True),
    ("lissa_hessian", "IFAttributorLiSSA", True),
    ("exact_fim", "IFAttributorExplicit", False),  # Fisher vs Hessian
    ("lissa", "IFAttributorLiSSA", False),  # Fisher vs Hessian
    ("exact_hessian", "IFAttributorExplicit_joint", False),  # block-diagonal vs joint
]
TENSORS = ["lora_A", "lora_B", "head.weight"]


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
        list(dict.fromkeys(m for m, _, _ in PAIRS)),
        damping=DampingConfig(mode="fixed", value=lam),
        lissa=LissaConfig(iters=LISSA_DEPTH, scale=LISSA_SCALE),
        grads=GradConfig(dtype="float64"),
    )
    tr, va = dm.train_dataset, dm.val_dataset
    res = engine.run(
        model.double(),
        select_params(model, TENSORS),
        model.per_sample_loss,
        lambda: [(torch.arange(len(tr)), {"x": tr.x.double(), "y": tr.y})],
        lambda: [(torch.arange(len(va)), {"x": va.x.double(), "y": va.y})],
    )
    model.float()
    return res.scores


def joint_hessian_diagnostics(dm, model, lam: float, dattri_joint: torch.Tensor) -> dict:
    """Why the layer-wise and the joint Hessian inverse disagree (information row).

    Builds the joint Hessian of the mean training loss over all trainable tensors in float64
    (``torch.autograd.functional.hessian``, independent of both libraries), reports the spectra
    of the damped joint matrix and of its diagonal blocks, and checks dattri's joint Explicit
    scores against a float64 joint solve.
    """
    from scipy.stats import spearmanr

    model = model.double()
    params = select_params(model, TENSORS)
    names = list(params)
    tr, va = dm.train_dataset, dm.val_dataset
    x, y = tr.x.double(), tr.y

    def mean_loss(*ws: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    blocks = torch.autograd.functional.hessian(
        mean_loss, tuple(p.detach() for p in params.values())
    )
    k = [p.numel() for p in params.values()]
    H = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(k[i], k[j]) for j in range(len(k))], 1)
            for i in range(len(k))
        ]
    )
    A = H + lam * torch.eye(H.shape[0], dtype=torch.float64)
    g_tr = per_sample_grads(model, params, model.per_sample_loss, {"x": x, "y": y}, orient=False)
    g_va = per_sample_grads(
        model, params, model.per_sample_loss, {"x": va.x.double(), "y": va.y}, orient=False
    )
    G = torch.cat([g_tr[n].flatten(1) for n in names], 1)
    v = torch.cat([g_va[n].flatten(1) for n in names], 1).mean(0)
    joint = -G @ torch.linalg.solve(A, v)
    eig = torch.linalg.eigvalsh(A)
    offsets = [sum(k[:i]) for i in range(len(k) + 1)]
    block_min = [
        float(torch.linalg.eigvalsh(A[a:b, a:b])[0]) for a, b in itertools.pairwise(offsets)
    ]
    model.float()
    return {
        "joint_damped_min_eig": float(eig[0]),
        "joint_damped_max_eig": float(eig[-1]),
        "joint_damped_negative_eigs": int((eig < 0).sum()),
        "joint_dim": int(A.shape[0]),
        "block_damped_min_eig": dict(zip(names, block_min, strict=True)),
        "spearman_float64_joint_vs_dattri_joint": float(
            spearmanr(joint.numpy(), dattri_joint.double().numpy())[0]
        ),
    }


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

    def task() -> AttributionTask:
        # a fresh task per attributor: with layer_name, dattri 0.3.0's partial_param writes the
        # traced tensors back into the task's parameter dict, so a task shared with another
        # layer_name fails inside torch.func ("level ... escaped")
        return AttributionTask(loss_func=loss_func, model=model, checkpoints=state)

    tr, va = dm.train_dataset, dm.val_dataset
    # one training batch: dattri re-solves the test transformation for every training batch, and
    # Explicit/LiSSA build their Hessian from the batches of this loader (a sum of per-batch
    # inverses if there were several)
    train_loader = DataLoader(TensorDataset(tr.x, tr.y), batch_size=len(tr), shuffle=False)
    test_loader = DataLoader(TensorDataset(va.x, va.y), batch_size=len(va), shuffle=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [any(t in n for t in TENSORS) for n in names] == [True] * len(names), names

    def per_tensor(make) -> list:
        # dattri inverts the joint Hessian of the tensors it is given: one run per tensor, summed
        # below, is the block-diagonal (layer-wise) inverse our engine uses
        return [make(layer_name=[n]) for n in names]

    attributors = {
        "inner_product": [BaseInnerProductAttributor(task=task())],
        "IFAttributorDataInf": [IFAttributorDataInf(task=task(), regularization=lam)],
        "IFAttributorExplicit": per_tensor(
            lambda **kw: IFAttributorExplicit(task=task(), regularization=lam, **kw)
        ),
        "IFAttributorLiSSA": per_tensor(
            lambda **kw: IFAttributorLiSSA(
                task=task(),
                damping=lam / LISSA_SCALE,  # dattri's fixed point is (H + s damping I)^-1
                scaling=LISSA_SCALE,
                recursion_depth=LISSA_DEPTH,
                batch_size=len(tr),  # randperm(n)[:n]: the full-batch Hessian every step
                **kw,
            )
        ),
        "IFAttributorExplicit_joint": [IFAttributorExplicit(task=task(), regularization=lam)],
    }
    out = {}
    for name, attrs in attributors.items():
        t0 = time.perf_counter()
        total = 0
        for attr in attrs:
            # no_grad: dattri's flattened parameters require grad, so without it every LiSSA
            # step's full-batch graph stays referenced by the next estimate (~0.2 GB per step
            # here; the torch.func transforms inside dattri ignore an outer no_grad)
            with torch.no_grad():
                attr.cache(train_loader)
                total = total + attr.attribute(train_loader, test_loader)  # (n_tr, n_te)
        out[name] = -total.mean(1)  # IF = - mean over test columns
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
        for m, d, same in PAIRS:
            x, y = a[m].double(), b[d].double()
            rows.append(
                {
                    "seed": seed,
                    "ours": m,
                    "dattri": d,
                    "same_method": same,
                    "spearman": float(spearmanr(x.numpy(), y.numpy())[0]),
                    "max_rel_diff": float((x - y).abs().max() / y.abs().max()),
                    "auc_ours": roc_auc(x, noisy),
                    "auc_dattri": roc_auc(y, noisy),
                    "auc_dattri_metric_on_dattri": float(mislabel_detection_auc(y, noisy)[0]),
                }
            )
        rows.append({"seed": seed, "ours_s": t1 - t0, "dattri_s": t2 - t1})
        diag = joint_hessian_diagnostics(dm, model, args.damping, b["IFAttributorExplicit_joint"])
        rows.append({"seed": seed, "joint_hessian": diag})
        print(f"seed {seed} joint Hessian: {diag}", flush=True)
    print(f"dattri {dattri.__version__ if hasattr(dattri, '__version__') else '0.3.0'}")
    print(
        "| seed | ours | dattri | same method | Spearman | max rel diff | AUC ours | AUC dattri |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ours" in r:
            print(
                f"| {r['seed']} | {r['ours']} | {r['dattri']} | {'yes' if r['same_method'] else 'no'}"
                f" | {r['spearman']:.5f} | {r['max_rel_diff']:.2e} | {r['auc_ours']:.3f} | "
                f"{r['auc_dattri']:.3f} |"
            )
    print(
        f"ours / dattri seconds per seed: {[(r['ours_s'], r['dattri_s']) for r in rows if 'ours_s' in r]}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
