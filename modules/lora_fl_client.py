"""Local training of one federated client inside a round (used by ``FederatedLoRAModule``).

A client starts from the global model, trains the *trainable tensors* of its mode (fresh LoRA
factors, a copy of the persistent factors, or all weights) with a fresh local optimizer and
warmup-cosine schedule, and returns its update ``Delta_c`` flattened over the server
parameters. All randomness (LoRA init, dropout, data order, DP sampling and noise) comes from the
client seed, so the result does not depend on which rank runs the client.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from modules.eval_mode import eval_mode
from modules.lora_fl_early_stopping import BestWeights, PatienceRule
from modules.token_perplexity import next_token_nll
from ops import dp
from ops.federated import flatten_tensors
from ops.goldfish import goldfish_cross_entropy, goldfish_drop_mask
from optim.schedules import warmup_cosine_factor

if TYPE_CHECKING:
    from modules.lora_fl import FederatedLoRAModule


class ClientTrainer:
    """Runs clients of one round for ``module`` on the data of ``datamodule``."""

    def __init__(self, module: FederatedLoRAModule, datamodule: Any, round_index: int, sizes):
        self.m, self.dm, self.round_index, self.sizes = module, datamodule, round_index, sizes
        self.local_steps: dict[int, int] = {}  # optimizer steps each client took this round
        if module.noise.mode == "dp_sgd" and module.dp_sigma is None:
            module.dp_sigma = self.resolve_dp_sigma()
        # Every client's noise level on every rank, so a bad value fails on all ranks at once
        # (a rank without a sampled client would otherwise wait in the round's all-reduce).
        self.output_sigmas = (
            [self.output_perturbation_sigma(c) for c in range(len(sizes))]
            if module.noise.mode == "output_perturbation"
            else []
        )

    # ------------------------------------------------------------------ schedules
    @staticmethod
    def dp_schedule(module: FederatedLoRAModule, num_samples: int) -> tuple[float, int]:
        """``(sample rate q = B / n_c, local steps per round)`` of a client."""
        batch = module.trainer.datamodule.batch_size
        steps = module.hparams.local_steps
        if steps is None:
            steps = module.hparams.local_epochs * math.ceil(num_samples / batch)
        return min(1.0, batch / num_samples), steps

    def resolve_dp_sigma(self) -> float:
        """``noise.sigma``, or the smallest multiplier giving every client ``target_epsilon``."""
        noise = self.m.noise
        if noise.sigma is not None:
            return float(noise.sigma)
        rounds = self.m.planned_rounds()
        sigmas = []
        for n in self.sizes:
            q, steps = self.dp_schedule(self.m, n)
            sigmas.append(
                dp.noise_multiplier_for_epsilon(
                    noise.target_epsilon, noise.delta, q, steps * rounds
                )
            )
        return max(sigmas)

    # ------------------------------------------------------------------ loss
    def loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy, with Goldfish drops when enabled."""
        logits = self.m.net(input_ids=input_ids).logits[:, :-1]
        targets = labels[:, 1:]
        gf = self.m.goldfish
        drop = (
            goldfish_drop_mask(
                input_ids[:, 1:],
                gf.k,
                gf.h,
                gf.strategy,
                gf.hash,
                incomplete_window=gf.incomplete_window,
            )
            if gf.enabled
            else None
        )
        return goldfish_cross_entropy(logits, targets, drop)

    # ------------------------------------------------------------------ modes
    def _start(self, stack: ExitStack) -> tuple[list[Tensor], Callable[[], Tensor]]:
        """Trainable tensors of this client and the function returning its flat update."""
        m, net = self.m, self.m.net
        if m.hparams.finetune_mode == "full":
            # The client trains the module's own weights. theta_r is restored when the client's
            # context closes, also on an exception (an on-exception checkpoint then holds
            # theta_r), and a checkpoint saved meanwhile stores theta_r (on_save_checkpoint).
            params = list(net.parameters())
            snapshot = [p.detach().clone() for p in params]
            m.round_start_weights = dict(zip(map(id, params), snapshot, strict=True))

            def restore_global_weights() -> None:
                with torch.no_grad():  # the next client starts from theta_r again
                    for p, s in zip(params, snapshot, strict=True):
                        p.copy_(s)
                        p.grad = None
                m.round_start_weights = None

            stack.callback(restore_global_weights)

            def finish_full() -> Tensor:
                deltas = (p.detach() - s for p, s in zip(params, snapshot, strict=True))
                return flatten_tensors(deltas, numel=sum(p.numel() for p in params))

            return params, finish_full
        adapter = m.adapter
        if m.hparams.lora_aggregation == "merged_delta_mean":
            factors = adapter.fresh_factors()  # global RNG, seeded per client
            stack.enter_context(adapter.attached(factors))

            def finish_merged() -> Tensor:
                deltas = (delta for _, delta in adapter.iter_merged_deltas(factors))
                return flatten_tensors(deltas, numel=adapter.merged_numel())

            return list(factors.values()), finish_merged
        names = adapter.factor_names()
        base = [m.adapter_factors[k.replace(".", "__")].detach() for k in names]
        factors = {k: b.clone().requires_grad_(True) for k, b in zip(names, base, strict=True)}
        stack.enter_context(adapter.attached(factors))

        def finish_factors() -> Tensor:
            return flatten_tensors(
                factors[k].detach() - b for k, b in zip(names, base, strict=True)
            )

        return list(factors.values()), finish_factors

    # ------------------------------------------------------------------ run
    def run(self, client: int, seed: int) -> tuple[Tensor, float]:
        """Train ``client`` for one round; returns ``(flat Delta_c in fp32, mean local loss)``."""
        m = self.m
        devices = [m.device.index or 0] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), ExitStack() as stack:
            torch.manual_seed(seed)
            data_gen = torch.Generator().manual_seed(seed ^ 0x5EED)
            noise_gen = torch.Generator().manual_seed(seed ^ 0xD1CE)
            trainable, finish = self._start(stack)
            opt = m.local_optimizer(trainable)
            if m.hparams.local_lr_per_client is not None:
                for group in opt.param_groups:
                    group["lr"] = m.hparams.local_lr_per_client[client]
            lr = opt.param_groups[0]["lr"]
            _, total = self.dp_schedule(m, self.sizes[client])
            warmup = m.hparams.local_warmup_steps
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_cosine_factor(s, warmup, total)
            )
            m.net.train()
            if m.noise.mode == "dp_sgd":
                losses = self._dp_loop(client, trainable, opt, sched, total, data_gen, noise_gen)
            else:
                losses = self._loop(client, trainable, opt, sched, total, data_gen)
            if m.noise.mode == "output_perturbation":
                sigma = self.output_sigmas[client]
                dp.add_output_perturbation(trainable, lr, sigma, m.noise.clip_norm, noise_gen)
            delta = finish()
        # Losses stay on the device during the loop (a float() per step would sync the GPU);
        # the Python sum of their float64 values is the same number as before.
        values = torch.stack(losses).double().cpu().tolist() if losses else []
        return delta, float(sum(values) / max(len(values), 1))

    def output_perturbation_sigma(self, client: int) -> float:
        noise = self.m.noise
        if noise.sigma is not None:
            return float(noise.sigma)
        q, steps = self.dp_schedule(self.m, self.sizes[client])
        total = steps * self.m.planned_rounds()
        return dp.output_perturbation_sigma(noise.target_epsilon, noise.delta, q, total, noise.c2)

    def _batches(self, client: int, total: int, data_gen: torch.Generator):
        done = 0
        while done < total:
            for batch in self.dm.client_dataloader(client, data_gen):
                if done == total:
                    return
                yield {k: v.to(self.m.device) for k, v in batch.items()}
                done += 1

    @torch.no_grad()
    def validation_loss(self, client: int) -> float:
        """Mean next-token NLL over the scored tokens of the client's held-out rows (plain
        cross-entropy, no Goldfish drops, dropout off), the early-stopping metric."""
        total, count = 0.0, 0
        with eval_mode(self.m.net):
            for batch in self.dm.client_val_dataloader(client):
                logits = self.m.net(input_ids=batch["input_ids"].to(self.m.device)).logits
                nll, n = next_token_nll(logits, batch["labels"].to(self.m.device))
                total, count = total + float(nll), count + int(n)
        return total / max(count, 1)

    def _loop(self, client, trainable, opt, sched, total, data_gen) -> list[Tensor]:
        max_norm = self.m.hparams.local_max_grad_norm
        stopping = self.m.local_early_stopping
        rule = PatienceRule(stopping.patience, stopping.min_delta) if stopping else None
        best = BestWeights(trainable) if stopping and stopping.load_best else None
        losses = []
        for batch in self._batches(client, total, data_gen):
            loss = self.loss(batch["input_ids"], batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            opt.step()
            sched.step()
            losses.append(loss.detach())
            if rule is not None and len(losses) % stopping.every_n_steps == 0:
                is_best, stop = rule.observe(self.validation_loss(client))
                if best is not None and is_best:
                    best.save()
                if stop:
                    break
        opt.zero_grad(set_to_none=True)
        if best is not None:
            best.restore()  # load_best_model_at_end: steps after the best evaluation are dropped
        self.local_steps[client] = len(losses)
        return losses

    def _dp_loop(self, client, trainable, opt, sched, total, data_gen, noise_gen) -> list[Tensor]:
        """DP-SGD: Poisson batches, per-sample clipping, Gaussian noise (Abadi et al. 2016)."""
        m, rows = self.m, self.dm.client_rows[client]
        q, _ = self.dp_schedule(m, len(rows))
        clip, sigma = m.noise.clip_norm, float(m.dp_sigma)
        losses = []
        for _ in range(total):
            idx = dp.poisson_sample(len(rows), q, data_gen).tolist()
            summed = [torch.zeros_like(p) for p in trainable]
            if idx:
                batch = [self.dm.collate([rows[i]]) for i in idx]

                def sample_loss(i: int, batch=batch) -> Tensor:
                    b = batch[i]
                    loss = self.loss(b["input_ids"].to(m.device), b["labels"].to(m.device))
                    losses.append(loss.detach())
                    return loss

                per = dp.per_sample_gradients(sample_loss, trainable, len(idx))
                summed = [g.sum(0) for g in dp.clip_per_sample(per, clip)]
            noisy = dp.dp_noise(summed, sigma, clip, q * len(rows), noise_gen)
            for p, g in zip(trainable, noisy, strict=True):
                p.grad = g
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        self.local_steps[client] = total
        return losses
