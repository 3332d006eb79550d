"""Federated fine-tuning (FedAvg) with LoRA or full weights, privacy add-ons and memorization.

Bossy et al., *Mitigating Unintended Memorization with LoRA in Federated Learning for LLMs*
(arXiv:2502.05087). One ``training_step`` is one federated round (so ``global_step`` counts
rounds and ``trainer.max_steps`` is the number of rounds):

1. sample the round's clients with a generator seeded by ``(seed, round)`` (same on all ranks);
2. every rank runs its clients (``c % world_size == rank``) one after the other; each client
   starts from the global model ``theta_r``, inside ``fork_rng`` seeded by
   ``(seed, round, client)`` (LoRA init, dropout, data order), with a fresh local optimizer and
   warmup-cosine schedule, and returns ``Delta_c`` over the *server parameters*;
3. ``sum_c w_c Delta_c`` is summed across ranks with one all-reduce (integers mod ``M`` under
   secure aggregation);
4. the server optimizer steps on the pseudo-gradient ``-sum_c w_c Delta_c`` (SGD lr 1 = FedAvg).

Server parameters by mode: ``full`` = every weight; ``lora`` + ``merged_delta_mean`` (paper) =
the target weights, updated by the merged deltas ``s B_c A_c`` of fresh per-round adapters;
``lora`` + ``factor_mean`` = persistent adapter factors (merged into the model only on export).
"""

from __future__ import annotations

import copy
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from modules import lora_fl_resume as resume
from modules.eval_mode import eval_mode
from modules.hf_models import build_causal_lm, is_pretrained_name, special_token_ids
from modules.lora_fl_client import ClientTrainer
from modules.lora_fl_memorization import canary_memorization
from modules.lora_fl_round import MaskedRoundSum, RoundSums
from modules.lora_fl_settings import (
    GoldfishSettings,
    LocalEarlyStoppingSettings,
    LoraFLSettings,
    MemorizationSettings,
    NoiseSettings,
    SecureAggregationSettings,
)
from modules.lora_fl_vocab import (
    check_checkpoint_vocabulary,
    check_data_vocabulary,
    network_record,
    restore_network,
)
from modules.precision import refuse_float64_on_mps
from modules.token_perplexity import next_token_nll
from modules.weighted_mean import update_weighted, weighted_mean
from ops import dp
from ops import secure_aggregation as sa
from ops.answer_match import answer_hits
from ops.federated import (
    LoraAggregation,
    apply_server_update,
    flatten_tensors,
    normalize_weights,
    unflatten_like,
)
from ops.federated_lora import LoraAdapter, find_lora_targets
from ops.seeding import derive_seed
from strategies.client_parallel import ClientParallelStrategy  # also registers the name


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def _fedavg(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1.0)


class FederatedLoRAModule(L.LightningModule):
    """One federated round per ``training_step`` (see the module docstring).

    Args:
        model: preset name, config dict (``model_type`` + sizes) or local directory of the
            initial (pretrained) model.
        vocab_size: embedding size for presets / dicts; ``None`` = ``len(datamodule.vocab)``.
        finetune_mode: ``lora`` (adapters on ``lora.target_modules``) or ``full`` (all weights).
        lora: LoRA rank / alpha / dropout / targets.
        lora_aggregation: ``merged_delta_mean`` (paper: fresh adapters each round, average of
            ``s B A``) or ``factor_mean`` (persistent adapters, average of ``A`` and ``B``).
        client_weights: explicit FedAvg weights, one per client; ``None`` = training sequences.
        clients_per_round: clients sampled per round; ``None`` = all (full participation).
        local_epochs: local epochs per round (ignored when ``local_steps`` is set).
        local_steps: fixed number of local steps per round (``None`` = epochs).
        local_optimizer: optimizer each client creates fresh every round.
        local_lr_per_client: per-client learning rates overriding the optimizer's ``lr``.
        local_warmup_steps: linear warmup steps of the local cosine schedule (restarted per round).
        local_max_grad_norm: batch-level global-norm clipping of local steps (``None`` = off).
        local_early_stopping: each client stops on its own held-out rows (official scripts:
            every 50 steps, patience 3, threshold 1e-3, best weights); ``None`` = off (spec
            default). Logged as ``round/local_steps`` (mean over the round's clients).
        goldfish: Goldfish loss settings.
        noise: gradient clipping / noise / DP settings.
        secure_aggregation: pairwise-masked fixed-point aggregation settings.
        memorization: canary extraction metric settings.
        server_optimizer: server optimizer on the pseudo-gradient (SGD lr 1 = FedAvg; Adam =
            FedAdam).
        seed: seed of client sampling and of every client's randomness.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "micro-llama",
        vocab_size: int | None = None,
        finetune_mode: Literal["lora", "full"] = "lora",
        lora: LoraFLSettings | None = None,
        lora_aggregation: LoraAggregation = "merged_delta_mean",
        client_weights: list[float] | None = None,
        clients_per_round: int | None = None,
        local_epochs: int = 1,
        local_steps: int | None = None,
        local_optimizer: OptimizerCallable = _adamw,
        local_lr_per_client: list[float] | None = None,
        local_warmup_steps: int = 75,
        local_max_grad_norm: float | None = 1.0,
        local_early_stopping: LocalEarlyStoppingSettings | None = None,
        goldfish: GoldfishSettings | None = None,
        noise: NoiseSettings | None = None,
        secure_aggregation: SecureAggregationSettings | None = None,
        memorization: MemorizationSettings | None = None,
        server_optimizer: OptimizerCallable = _fedavg,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if finetune_mode not in ("lora", "full"):
            raise ValueError(f"finetune_mode must be 'lora' or 'full', got {finetune_mode!r}")
        if lora_aggregation not in ("merged_delta_mean", "factor_mean"):
            raise ValueError(f"lora_aggregation={lora_aggregation!r} is not a known mode")
        # 0 or less ran silently: local_steps=0 fell back to epochs, < 0 trained nothing
        counts = {
            "clients_per_round": clients_per_round,
            "local_epochs": local_epochs,
            "local_steps": local_steps,
        }
        for key, value in counts.items():
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 (or null where allowed), got {value}")
        if local_warmup_steps < 0:
            raise ValueError(f"local_warmup_steps must be >= 0, got {local_warmup_steps}")
        self.save_hyperparameters(ignore=["local_optimizer", "server_optimizer"])
        self.automatic_optimization = False
        self.lora = lora or LoraFLSettings()
        self.goldfish = goldfish or GoldfishSettings()
        self.noise = noise or NoiseSettings()
        self.secagg = secure_aggregation or SecureAggregationSettings()
        self.mem = memorization or MemorizationSettings()
        self.local_early_stopping = local_early_stopping
        if local_early_stopping is not None and self.noise.mode == "dp_sgd":
            raise ValueError(
                "local_early_stopping picks each client's weights on its held-out rows, which "
                "noise.mode='dp_sgd' does not account for: turn one of them off"
            )
        self.local_optimizer, self.server_optimizer = local_optimizer, server_optimizer
        self.net: nn.Module | None = None
        self.adapter: LoraAdapter | None = None
        self.adapter_factors = nn.ParameterDict()
        self.accountant_history: dict[int, list] = {}
        self.dp_sigma: float | None = None
        self.weight_noise_round: int | None = None  # the round after which it was merged
        self._checkpoint_noise_plan: dict[str, Any] | None = None  # see on_train_start
        self.last_memorization: dict[str, float] = {}
        self.last_round_stats: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # per-round stats of this process (diagnostics)
        # theta_r by parameter id while a full fine-tuning client trains the module's weights.
        self.round_start_weights: dict[int, Tensor] | None = None
        self.val_loss = weighted_mean()  # mean over answer tokens, not over batches
        if vocab_size is not None or is_pretrained_name(model):
            self.build_model(vocab_size)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, ParallelStrategy) and not isinstance(
            strategy, ClientParallelStrategy
        ):
            # A DDP wrapper would all-reduce every local client step (or, with LoRA's frozen
            # weights, refuse to wrap at all, even on one device); clients are simulated per
            # rank instead.
            raise ValueError(
                "FederatedLoRAModule needs strategy 'client_parallel' (or "
                f"'client_parallel_spawn') or a single device, got {type(strategy).__name__}: "
                "set `trainer.strategy: client_parallel` (`--trainer.strategy client_parallel`)"
            )
        refuse_float64_on_mps(
            strategy.root_device, "FederatedLoRAModule",
            "checksums the global weights every round and aggregates under SecAgg",
        )  # fmt: skip
        precision = str(self.trainer.precision)
        if precision not in ("32-true", "32", "64-true", "bf16-mixed"):
            # 16-mixed: local steps bypass Lightning's GradScaler. *-true half precision: the
            # global weights themselves would be half, and merged deltas ~1e-4 of weights ~1e-2
            # vanish in their 8-bit mantissa (spec section 9).
            raise ValueError(
                f"precision={precision!r} is not supported by FederatedLoRAModule: use '32-true' "
                "or 'bf16-mixed' (global weights must stay fp32)"
            )
        dm = self.trainer.datamodule
        if self.net is None:
            if not hasattr(dm, "vocab"):
                raise ValueError("vocab_size is None and the datamodule has no 'vocab' to size it")
            self.build_model(len(dm.vocab), special_token_ids(dm.vocab))
        elif hasattr(dm, "vocab"):
            check_data_vocabulary(self.hparams.model, self.net, dm.vocab)
        sizes = getattr(dm, "client_num_samples", None)
        if sizes is not None:
            self._check_client_settings(len(sizes), list(sizes))
            if self.local_early_stopping is not None:
                # Every client's held-out rows, on every rank now: a client without them would
                # fail inside a round, on its rank only, while the others wait in the all-reduce.
                for client in range(len(sizes)):
                    dm.client_val_dataloader(client)
        if self.secagg.enabled:  # refuse a modulus the sum of all clients could wrap
            num_clients = getattr(self.trainer.datamodule, "num_clients", None)
            if num_clients is not None:
                sa.check_no_wrap(
                    num_clients, self.secagg.clip_range, self.secagg.frac_bits,
                    self.secagg.modulus_bits,
                )  # fmt: skip

    def planned_rounds(self) -> int:
        """Rounds this fit will run (one per optimizer step), for the DP accounting.

        ``trainer.max_steps`` is -1 when ``max_epochs`` bounds the run, and larger than the
        rounds run when the epochs end first; Lightning's estimate covers both.
        """
        rounds = self.trainer.estimated_stepping_batches
        if not math.isfinite(rounds) or rounds < 1:
            raise ValueError(
                f"noise.target_epsilon needs a finite number of rounds, got {rounds}: set "
                "trainer.max_steps or trainer.max_epochs"
            )
        return int(rounds)

    def _check_client_settings(self, num_clients: int, sizes: list[int]) -> None:
        """Per-client settings must cover every client, and every client must hold data."""
        lrs = self.hparams.local_lr_per_client
        if lrs is not None and len(lrs) != num_clients:
            raise ValueError(
                f"local_lr_per_client has {len(lrs)} entries for {num_clients} clients"
            )
        k = self.hparams.clients_per_round
        if k is not None and k > num_clients:
            raise ValueError(
                f"clients_per_round={k} exceeds the {num_clients} clients of the data "
                "(null = all of them)"
            )
        empty = [c for c, n in enumerate(sizes) if n == 0]
        if empty:
            raise ValueError(
                f"clients {empty} hold no training sequences (client sizes {sizes}): change the "
                "data partition (e.g. a larger Dirichlet alpha or another partition seed)"
            )

    def build_model(
        self, vocab_size: int | None, special_ids: dict[str, int] | None = None
    ) -> None:
        """Build the network (and adapters); done in ``__init__`` when the vocab size is known,
        else in ``setup`` with the data vocabulary's size and special token ids."""
        self.net = build_causal_lm(
            self.hparams.model, vocab_size=vocab_size, dtype="float32", special_ids=special_ids
        )
        self.net.train()  # from_pretrained returns eval mode (Lightning warned at every fit)
        if self.hparams.finetune_mode == "lora":
            self.net.requires_grad_(False)
            self.adapter = LoraAdapter(
                self.net, self.lora.target_modules, self.lora.rank, self.lora.alpha,
                self.lora.dropout,
            )  # fmt: skip
            if self.hparams.lora_aggregation == "factor_mean":
                init = self.adapter.fresh_factors(torch.Generator().manual_seed(self.hparams.seed))
                for k, v in init.items():
                    self.adapter_factors[k.replace(".", "__")] = nn.Parameter(v.detach())

    def server_parameters(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of what the server optimizer steps, in a fixed order."""
        assert self.net is not None
        if self.hparams.finetune_mode == "full":
            return list(self.net.named_parameters())
        assert self.adapter is not None
        if self.hparams.lora_aggregation == "factor_mean":
            return list(self._server_factors().items())
        params = dict(self.net.named_parameters())
        return [(f"{n}.weight", params[f"{n}.weight"]) for n in self.adapter.targets]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.net is None:
            raise RuntimeError("the model is built in setup(); configure_optimizers ran before it")
        return self.server_optimizer([p for _, p in self.server_parameters()])

    # ------------------------------------------------------------------ one round
    def sample_clients(self, round_index: int, num_clients: int) -> list[int]:
        """Participants of a round: all, or ``clients_per_round`` drawn by ``(seed, round)``."""
        k = self.hparams.clients_per_round
        if k is None or k >= num_clients:
            return list(range(num_clients))
        gen = torch.Generator().manual_seed(derive_seed(self.hparams.seed, round_index, -1))
        return sorted(torch.randperm(num_clients, generator=gen)[:k].tolist())

    def client_weights(self, clients: list[int], sizes: list[int]) -> list[float]:
        explicit = self.hparams.client_weights
        if explicit is not None and len(explicit) != len(sizes):
            raise ValueError(f"client_weights has {len(explicit)} entries for {len(sizes)} clients")
        raw = [float((explicit or sizes)[c]) for c in clients]
        return normalize_weights(raw).tolist()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        round_index = self.trainer.global_step  # resume-safe: not the batch content
        sizes = list(dm.client_num_samples)
        clients = self.sample_clients(round_index, len(sizes))
        weights = dict(zip(clients, self.client_weights(clients, sizes), strict=True))
        rank, world = self.global_rank, self.trainer.world_size
        server = [p for _, p in self.server_parameters()]
        sums = RoundSums(server, self.device)
        masked = None
        if self.secagg.enabled:
            masked = MaskedRoundSum(
                self.secagg, sums.numel, self.device, clients, round_index, self.hparams.seed
            )
        trainer = ClientTrainer(self, dm, round_index, sizes)
        for c in clients:
            if c % world != rank:
                continue
            delta, loss = trainer.run(c, derive_seed(self.hparams.seed, round_index, c))
            update = delta.mul_(weights[c])  # in place: w_c Delta_c, the model-sized buffer
            sums.add_client(update, weights[c], loss, trainer.local_steps[c])
            if masked is not None:
                masked.add_client(update, c)
            # Not alive while the next client trains (model-sized under merged_delta_mean).
            del delta, update
        self._account_dp(clients, sizes)

        # The round's single aggregation all-reduce (plus the integer one under SecAgg).
        sums.all_reduce(self.trainer.strategy)
        aggregate, secagg_stats = sums.update, {}
        if masked is not None:
            aggregate, secagg_stats = self._unmask(masked, sums)
        opt = self.optimizers()
        apply_server_update(server, unflatten_like(aggregate, server), opt.optimizer, opt.step)

        # The final round, whether the run is bounded by max_steps or by max_epochs of the driver.
        last = round_index + 1 == self.trainer.estimated_stepping_batches
        self.last_round_stats = self._round_stats(sums, aggregate)
        if last and self.noise.mode == "weight_noise" and self.weight_noise_round != round_index:
            # Post-hoc, like the official script run on the trained model: before the final
            # memorization evaluation, validation and export. (A run resumed with more rounds
            # trains over the earlier draw and gets a new one at its own last round.)
            self.last_round_stats["noise/weight_noise_norm"] = self.apply_weight_noise(round_index)
        self.log_dict(self.last_round_stats, prog_bar=False)
        self.history.append({"round": round_index + 1, **self.last_round_stats, **secagg_stats})
        self.log("round", float(round_index + 1), prog_bar=True)

        every = self.mem.every_n_rounds
        if self.mem.enabled and (last or (every and (round_index + 1) % every == 0)):
            self.last_memorization = self.evaluate_memorization()
            self.log_dict({f"mem/{k}": v for k, v in self.last_memorization.items()})

    def _unmask(self, masked: MaskedRoundSum, sums: RoundSums) -> tuple[Tensor, dict[str, float]]:
        """The SecAgg aggregate, logged against the plain sum it must equal up to quantization."""
        aggregate = masked.unmask(self.trainer.strategy)
        err = float((aggregate - sums.update.double()).abs().max())
        clipped = float(masked.clipped_coordinates)
        self.log("secagg/max_abs_error", err)
        self.log("secagg/error_bound", masked.error_bound())
        self.log("secagg/clipped_coordinates_rank0", clipped)
        return aggregate.float(), {"secagg/max_abs_error": err, "secagg/clipped_rank0": clipped}

    def _uploaded_values(self, numel: int) -> int:
        """Values one client uploads per round: its factors for LoRA (the server merges them)
        unless SecAgg must mask the dense merged delta (a masked sum of factors cannot give the
        sum of products), else the ``numel`` server parameters."""
        if self.adapter is None or (
            self.secagg.enabled and self.hparams.lora_aggregation == "merged_delta_mean"
        ):
            return numel
        return sum(self.adapter.rank * (lin.in_features + lin.out_features)
                   for lin in self.adapter.targets.values())  # fmt: skip

    def _round_stats(self, sums: RoundSums, aggregate: Tensor) -> dict[str, float]:
        bits = self.secagg.modulus_bits if self.secagg.enabled else 32
        stats = {
            "round/train_loss": sums.weighted_loss,
            "round/update_norm": float(aggregate.norm()),
            "round/bytes_per_client": float(self._uploaded_values(sums.numel) * bits / 8),
            "round/clients": sums.clients,
            "round/local_steps": sums.mean_local_steps,
            "round/rank_desync": sums.rank_desync(self.trainer.world_size),
        }
        if self.noise.mode == "dp_sgd":
            stats["dp/epsilon"] = self.epsilon()
            stats["dp/sigma"] = float(self.dp_sigma or 0.0)
        if self.noise.mode == "output_perturbation":
            stats["dp/heuristic_epsilon"] = float(self.noise.target_epsilon or 0)
        return stats

    def on_train_end(self) -> None:
        last_round = self.global_step - 1
        stopped_early = last_round >= 0 and self.weight_noise_round != last_round
        if self.noise.mode == "weight_noise" and stopped_early:
            # Stopped before the planned last round (early stopping, max_time): the exported
            # model still gets its noise, but the mem/* metrics logged so far predate it.
            self.apply_weight_noise(last_round)
            rank_zero_warn(
                f"noise.mode='weight_noise': training stopped after round {self.global_step} "
                "instead of the planned last round; the noise was merged at the end of training, "
                "after the last logged memorization evaluation"
            )

    @torch.no_grad()
    def apply_weight_noise(self, round_index: int) -> float:
        """``noise.mode: weight_noise`` (official ``src/noise.py``): every LoRA target of the
        global model moves by ``s N_B (A + N_A)``, the merge of a fresh adapter (``A`` Kaiming,
        ``B = 0``) whose factors got ``N(0, sigma^2)`` noise; a low-rank perturbation. The draw
        depends on ``(seed, round_index)`` only, so every rank applies the same one. Returns its
        Frobenius norm.
        """
        assert self.net is not None and self.noise.sigma is not None
        self.weight_noise_round = round_index
        targets = (
            self.adapter.targets if self.adapter is not None
            else find_lora_targets(self.net, self.lora.target_modules)
        )  # fmt: skip
        gen = torch.Generator().manual_seed(derive_seed(self.hparams.seed, -2, round_index))
        scale, squared = self.lora.alpha / self.lora.rank, 0.0
        # Built on the CPU in fp32 whatever the precision plugin: bf16-mixed autocast would
        # otherwise round the product s N_B (A + N_A).
        with torch.autocast("cpu", enabled=False):
            for lin in targets.values():
                delta = dp.weight_noise_delta(
                    lin.in_features, lin.out_features, self.lora.rank, scale, self.noise.sigma, gen
                )
                lin.weight.add_(delta.to(lin.weight))
                squared += float(delta.double().pow(2).sum())
        return math.sqrt(squared)

    # ------------------------------------------------------------------ DP accounting
    def _account_dp(self, clients: list[int], sizes: list[int]) -> None:
        """Every rank records every sampled client's steps, so epsilon is rank-independent."""
        if self.noise.mode != "dp_sgd":
            return
        for c in clients:
            q, steps = ClientTrainer.dp_schedule(self, sizes[c])
            history = self.accountant_history.setdefault(c, [])
            if history and tuple(history[-1][:2]) == (self.dp_sigma, q):
                # RDP composes additively: one entry per (sigma, q) run, as Opacus's own
                # accountant keeps it. One entry per round made epsilon() (every round)
                # re-evaluate the whole history: round R cost O(R), a run O(R^2).
                history[-1] = (self.dp_sigma, q, history[-1][2] + steps)
            else:
                history.append((self.dp_sigma, q, steps))

    def epsilon(self) -> float:
        """Worst client's ``epsilon(delta)`` under RDP accounting (``inf`` before any step)."""
        eps = 0.0
        for history in self.accountant_history.values():
            acc = dp.make_accountant()
            acc.history = [tuple(h) for h in history]
            eps = max(eps, float(acc.get_epsilon(self.noise.delta)))
        return eps

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_memorization(self) -> dict[str, float]:
        """Canary extraction metric on the current global model, sharded over ranks."""
        assert self.net is not None
        strategy = self.trainer.strategy

        def all_reduce_sum(counts: Tensor) -> Tensor:
            return strategy.reduce(counts.to(self.device), reduce_op="sum")

        with eval_mode(self.net), self.global_model():
            return canary_memorization(
                self.net, self.trainer.datamodule, self.mem, self.global_rank,
                self.trainer.world_size, all_reduce_sum,
            )  # fmt: skip

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        assert self.net is not None
        with self.global_model():
            logits = self.net(input_ids=batch["input_ids"]).logits
        loss_sum, tokens = next_token_nll(logits, batch["labels"])
        update_weighted(self.val_loss, loss_sum / tokens.clamp_min(1), tokens)
        correct, first_correct = answer_hits(logits, batch["labels"])
        n = batch["input_ids"].shape[0]
        self.log("val/loss", self.val_loss, batch_size=n)
        self.log("val/answer_acc", correct.mean(), batch_size=n, prog_bar=True)
        self.log("val/answer_first_token_acc", first_correct.mean(), batch_size=n)
        if "client" in batch:  # utility per client: one template family / data source each
            for c in batch["client"].unique().tolist():
                mine = batch["client"] == c
                self.log(
                    f"val/answer_acc_client{c}", correct[mine].mean(), batch_size=int(mine.sum())
                )

    def on_validation_epoch_start(self) -> None:
        # States left by a standalone ``trainer.validate`` are inference tensors.
        self.val_loss.reset()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.round_start_weights is not None:  # saved from inside a round
            live = self.state_dict(keep_vars=True)
            resume.store_round_start_weights(
                live, self.round_start_weights, checkpoint["state_dict"]
            )
        # Client randomness is derived from (seed, round, client): nothing else to save.
        checkpoint["lora_fl"] = {
            "accountant_history": {int(c): list(h) for c, h in self.accountant_history.items()},
            "dp_sigma": self.dp_sigma,
            "weight_noise_round": self.weight_noise_round,
            "noise_plan": resume.noise_plan(self.noise, self.planned_rounds),
            "network": network_record(self.net),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lora_fl", {})
        restore_network(self, state.get("network"))
        check_checkpoint_vocabulary(checkpoint.get("state_dict", {}), self.net)
        self.accountant_history = {
            int(c): [tuple(x) for x in h] for c, h in state.get("accountant_history", {}).items()
        }
        self.dp_sigma = resume.resumed_dp_sigma(self.noise, state.get("dp_sigma"))
        self.weight_noise_round = state.get("weight_noise_round")
        self._checkpoint_noise_plan = state.get("noise_plan")

    def on_train_start(self) -> None:
        current = resume.noise_plan(self.noise, self.planned_rounds)
        resume.check_noise_plan(self._checkpoint_noise_plan, current, self.dp_sigma)

    def global_model(self) -> AbstractContextManager:
        """Within the block ``self.net`` computes the global model: with persistent adapters
        (``factor_mean``) the server's factors live outside the weights and are hooked in here."""
        if not self.persistent_adapters:
            return nullcontext()
        return self.adapter.attached(self._server_factors())

    @property
    def persistent_adapters(self) -> bool:
        """LoRA factors that live across rounds (``factor_mean``), outside the weights."""
        return self.adapter is not None and self.hparams.lora_aggregation == "factor_mean"

    def _server_factors(self) -> dict[str, Tensor]:
        """The persistent adapter factors of ``factor_mean``, keyed by the adapter's names."""
        assert self.adapter is not None
        return {k: self.adapter_factors[k.replace(".", "__")] for k in self.adapter.factor_names()}

    def merged_model(self) -> nn.Module:
        """The global model with persistent adapters merged in (what ``save_pretrained`` saves)."""
        assert self.net is not None
        net = copy.deepcopy(self.net)
        if self.persistent_adapters:
            self.adapter.merge_into(net, self._server_factors())
        return net

    def save_pretrained(self, directory: str | Path, merge_lora: bool = True) -> Path:
        """Write the global model, adapters merged, in Hugging Face format (``ExportPretrained``).

        The server state is merged weights (or factor means merged here), so the export is always
        a plain model; ``merge_lora`` is accepted for the callback's protocol. The data's
        tokenizer is written too (the character vocabulary as a one-token-per-character one).
        """
        if self.net is None:
            raise RuntimeError(
                "the model is built in setup() (or with vocab_size): nothing to save"
            )
        directory = Path(directory)
        # Only persistent adapters need a merged copy; otherwise the weights are the export
        # (a copy of the whole model at the end of every fit, +290 MB for SmolLM2-135M).
        net = self.merged_model() if self.persistent_adapters else self.net
        net.save_pretrained(directory)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        vocab = getattr(datamodule, "vocab", None)
        if vocab is not None:
            vocab.hf_tokenizer().save_pretrained(directory)
        return directory

    def flat_server_state(self) -> Tensor:
        """All server parameters as one flat fp32 vector (for equality tests / checksums)."""
        return flatten_tensors(p for _, p in self.server_parameters())
