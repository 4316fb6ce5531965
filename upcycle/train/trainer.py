"""The training engine behind every recipe: one loop, components around it.

    upcycle train continued_pretraining                 # one process
    torchrun --nproc-per-node 2 -m upcycle train lima_sft distributed=fsdp

    from upcycle.train import load_recipe, train
    summary = train(load_recipe("continued_pretraining", ["max_steps=50"]))

Loss: token-level cross-entropy summed over the global batch and divided by its number of
target tokens, so the result does not depend on how the batch is split into micro-batches
or processes (the 1-vs-2-process test), plus the MoE auxiliary losses averaged over
micro-batches.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import math
import os
import shutil
import signal
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from upcycle.errors import UpcycleError
from upcycle.inference import check_token_ids
from upcycle.io import write_json, write_text
from upcycle.moe.block import aux_loss
from upcycle.train import checkpointing as ckpt
from upcycle.train import distributed, expert_sharding
from upcycle.train.config import TrainConfig, to_yaml
from upcycle.train.loop import run_loop
from upcycle.train.model import build_model
from upcycle.train.optim import build_optimizer, build_scheduler, check_optimizer
from upcycle.train.telemetry import MetricsWriter, RoutingTelemetry


class TrainingDiverged(UpcycleError):
    """The loss or the gradient norm became NaN or infinite."""


class _StopFlag:
    """SIGTERM / Ctrl-C ask for a clean stop at the end of the current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        tqdm.write(f"upcycle: {self.signal} received: finishing this step, saving a checkpoint "
                   "(Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@functools.lru_cache(maxsize=2)
def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation cut into ``batch_size`` pieces."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n // batch_size)]


class Trainer:
    """Holds the run's pieces; ``run()`` trains to the end (or to a stop) and returns a summary."""

    def __init__(self, cfg: TrainConfig):
        from upcycle.data import build_datasets
        from upcycle.data.text import count_targets, max_token_id

        cfg.validate()
        self.cfg = cfg
        self.d = distributed.init(cfg.device)
        d = self.d
        if d.enabled and cfg.distributed == "fsdp" and cfg.lora is not None:
            raise UpcycleError("distributed: fsdp with lora is not supported; use ddp (only the adapter is trained)")
        if d.enabled and cfg.distributed == "fsdp" and cfg.experts_subset is not None:
            # An ESFT checkpoint is written from the main process's parameters, which FSDP shards.
            raise UpcycleError("distributed: fsdp with experts_subset is not supported; use ddp (ESFT trains a "
                               "fraction of the model)")
        if d.enabled and cfg.distributed == "fsdp" and cfg.optim.name != "adamw":
            raise UpcycleError(f"distributed: fsdp with optim.name={cfg.optim.name} is not supported (bitsandbytes' "
                               "optimizers do not step sharded parameters); use ddp, or optim.name=adamw")
        check_optimizer(cfg.optim.name)  # a missing bitsandbytes fails before anything is loaded
        expert_sharding.check_request(cfg, d.world)
        micro_per_step = cfg.batch_size // cfg.micro_batch_size
        if micro_per_step % d.world:
            raise UpcycleError(f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size x processes "
                               f"({cfg.micro_batch_size} x {d.world})")
        self.micro_per_step = micro_per_step
        self.autocast = self._autocast()
        # The main process decides where to resume (every node may not see the same disk).
        self.resume_from = d.broadcast(self._check_out() if d.main else None)
        if self.resume_from and not os.path.isdir(self.resume_from):
            raise UpcycleError(f"process {d.rank} cannot see {self.resume_from}: out must be on a filesystem "
                               "shared by all processes")
        self.state = ckpt.load_trainer_state(self.resume_from) if self.resume_from else None
        if self.state is not None:
            ckpt.check_compatible(self.state, cfg, self.resume_from)
        torch.manual_seed(cfg.seed)  # adapter init: the same on every process
        kind = cfg.checkpoint_kind
        full_resume = self.resume_from if self.resume_from and kind == "full" else None
        model, self.tokenizer, self.model_info = build_model(cfg, d.device, source=full_resume)
        expert_sharding.check_model(model, cfg)
        self.fingerprint = None
        if kind != "full":  # adapter or ESFT checkpoints: what was trained, over the recipe's model
            from upcycle.adapters import base_fingerprint

            self.fingerprint = base_fingerprint(cfg.model) if d.main else None
            if self.resume_from:
                ckpt.check_adapter_base(self.resume_from, cfg.model, self.fingerprint, kind)
        # Data: the main process first, so the others find its datasets cache.
        if not d.main:
            d.barrier()
        self.train_ds, self.eval_ds, self.data_report = build_datasets(
            cfg.data, self.tokenizer, seed=cfg.seed, log=tqdm.write if d.main else (lambda *_: None))
        if d.main:
            d.barrier()
        for ds, what in ((self.train_ds, "training"), (self.eval_ds, "held-out")):
            if ds is not None and len(ds):  # an id beyond the embeddings: one line now, not an IndexError mid-run
                check_token_ids(model, max_token_id(ds), f"the {what} data, as {cfg.model}'s tokenizer encodes it,")
        self.steps_per_epoch = len(self.train_ds) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UpcycleError(f"the training set has {len(self.train_ds)} sequences, fewer than batch_size "
                               f"({cfg.batch_size})")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        if self.state is not None:
            ckpt.check_steps(self.state, self.total_steps, self.resume_from)
            ckpt.check_same_data(self.state, self.data_report["train"], self.resume_from)
        self.experts_subset = self._experts_subset(model) if cfg.experts_subset is not None else None
        if self.resume_from and kind == "adapter":
            from upcycle.adapters import load_adapter_weights

            load_adapter_weights(model, self.resume_from)
        elif self.resume_from and kind == "esft":
            from upcycle.models.esft import load_esft_tensors

            load_esft_tensors(model, self.resume_from, self.experts_subset["experts"])
        self.n_targets = count_targets(self.train_ds)
        # Counted once: every evaluation sums them per micro-batch.
        self.eval_targets = count_targets(self.eval_ds) if self.eval_ds is not None else []
        if not sum(self.eval_targets):  # no held-out data, or none with a target token: no evaluation, said now
            self.eval_ds = None
            if d.main and (cfg.data.eval is not None or cfg.data.eval_fraction > 0):
                held, data = self.data_report["eval"], cfg.data
                why = (f"{held['source']} has no token to score" if held else
                       f"data.train {data.train} leaves nothing to hold out at eval_fraction {data.eval_fraction:g}")
                when = f"every {cfg.eval_every} steps nor at the end" if cfg.eval_every else "at the end"
                warnings.warn(f"no held-out data: {why}; no evaluation will run ({when}): set data.eval to a file or "
                              "dataset to evaluate on", stacklevel=2)
        # Expert parallelism cuts the experts before DDP / FSDP see them (after any adapter was loaded whole).
        self.layout = expert_sharding.build_layout(model, d, cfg)
        self.model = (expert_sharding.wrap(model, d, self.layout) if self.layout is not None
                      else distributed.wrap(model, d, cfg.distributed))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps)
        self.step = 0
        self.telemetry = RoutingTelemetry(self.model, warn=d.main)
        self.changes = {}
        if self.state is not None:
            ckpt.restore(self.state, self.model, self.optimizer, self.scheduler, d, layout=self.layout)
            self.step = int(self.state["step"])
            self.changes = ckpt.recipe_changes(self.state.get("recipe"), cfg)
            if d.main and "routing_sums" in self.state:
                self.telemetry.restore(self.state["routing_sums"])
        else:
            torch.manual_seed(cfg.seed * 1009 + d.rank)  # dropout masks differ across processes
        self._init_out()  # only now that model, data and state are known good: bad input writes nothing
        self.metrics = None
        if d.main:
            self.metrics = MetricsWriter(cfg.out, cfg.tensorboard, resume_step=self.step if self.resume_from else None)
            if self.changes:  # what ran before this step is in the checkpoint's recipe, what runs now in recipe.yaml
                self.metrics.write({"type": "resume", "step": self.step, "changed": self.changes})

    # ---- setup -------------------------------------------------------------------------
    def _check_out(self) -> str | None:
        """The checkpoint to resume from, if any; refuses to start over an existing run."""
        cfg = self.cfg
        if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise UpcycleError(f"out {cfg.out} is a file, not a run directory")
        resume = ckpt.resolve_resume(cfg.resume, cfg.out) if cfg.resume else None
        busy = os.path.exists(os.path.join(cfg.out, "metrics.jsonl")) or ckpt.checkpoint_dirs(cfg.out)
        if busy and resume is None and cfg.resume != "auto" and not cfg.overwrite:
            raise UpcycleError(f"{cfg.out} holds a run already: pass resume=auto to continue it, "
                               "overwrite=true to start afresh, or another out=")
        if resume and busy and not _inside(resume, cfg.out) and not cfg.overwrite:
            raise UpcycleError(f"{cfg.out} holds another run: resume {resume} into a new out=, or pass overwrite=true")
        self._fresh_over_old = bool(busy and (resume is None or not _inside(resume, cfg.out)))
        if self._fresh_over_old and _inside(cfg.model, os.path.join(cfg.out, "checkpoints")):
            raise UpcycleError(f"model {cfg.model} lies in {cfg.out}, which overwrite would delete: choose another out=")
        return resume

    def _init_out(self) -> None:
        cfg, d = self.cfg, self.d
        if d.main:
            try:
                if self._fresh_over_old:
                    for name in ("checkpoints", "metrics.jsonl", "tb", "plots"):
                        path = os.path.join(cfg.out, name)
                        if os.path.isdir(path):
                            shutil.rmtree(path)
                        elif os.path.exists(path):
                            os.remove(path)
                elif self.resume_from:
                    ckpt.drop_after(cfg.out, self.step)  # the abandoned future of an earlier attempt
                ckpt.remove_partial(cfg.out)
                os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
                if os.path.exists(os.path.join(cfg.out, "summary.json")):
                    os.remove(os.path.join(cfg.out, "summary.json"))  # describes an earlier attempt
                write_text(os.path.join(cfg.out, "recipe.yaml"), to_yaml(cfg))
                if self.experts_subset is not None:
                    write_json(os.path.join(cfg.out, "experts_subset.json"), self.experts_subset)
            except OSError as e:
                raise UpcycleError(f"cannot write the run directory {cfg.out}: {e}") from None
        d.barrier()

    def _experts_subset(self, model) -> dict:
        """ESFT: choose the experts to train (or take the resumed run's choice) and freeze the rest."""
        from upcycle.adapters import trainable_summary
        from upcycle.train.esft import choose_experts, format_choice, restrict_training, route_sample

        cfg, d, sub = self.cfg, self.d, self.cfg.experts_subset
        rec = (self.state or {}).get("experts_subset")
        if rec is None:  # a fresh run: route a sample of the training set (the first of epoch 1's order)
            if d.main:
                order = [k for batch in epoch_batches(len(self.train_ds), cfg.batch_size, cfg.seed, 0) for k in batch]
                sample = [self.train_ds[k] for k in order[:sub.sample]]
                stats = route_sample(model, sample, micro_batch_size=cfg.micro_batch_size,
                                     pad_id=self.tokenizer.pad_token_id, device=d.device, autocast=self.autocast)
                choice = choose_experts(stats, sub)
                rec = {"experts": choice, "settings": dataclasses.asdict(sub), "sequences": len(sample),
                       "stats": stats, "table": format_choice(choice, stats, sub, len(sample))}
            rec = d.broadcast(rec)
        restrict_training(model, rec["experts"], sub, lora=cfg.lora is not None)
        self.model_info["trainable"] = trainable_summary(model)
        if d.main:
            tqdm.write(rec["table"] + (" (the resumed run's choice)" if self.state is not None else ""))
        return rec

    def _autocast(self):
        cfg, dev = self.cfg, self.d.device
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
        if bf16 and dev.type != "cuda":
            raise UpcycleError("precision bf16 needs a GPU; on the CPU train in fp32 (precision=fp32)")
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    # ---- one step --------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> tuple[list[list[int]], int]:
        """This process's micro-batches of global step ``step``, and the batch's target-token count."""
        cfg = self.cfg
        epoch, i = divmod(step, self.steps_per_epoch)
        batch = epoch_batches(len(self.train_ds), cfg.batch_size, cfg.seed, epoch)[i]
        micro = [batch[j:j + cfg.micro_batch_size] for j in range(0, len(batch), cfg.micro_batch_size)]
        return micro[self.d.rank::self.d.world], sum(self.n_targets[k] for k in batch)

    def _forward(self, idx: list[int], training: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(summed cross-entropy, aux loss or 0, non-pad tokens) of one micro-batch."""
        from upcycle.data import collate

        batch = collate([self.train_ds[k] if training else self.eval_ds[k] for k in idx],
                        pad_id=self.tokenizer.pad_token_id)
        batch = {k: v.to(self.d.device) for k, v in batch.items()}
        with self.autocast():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                             ignore_index=-100, reduction="sum")
        aux = aux_loss(distributed.unwrap(self.model)) if training else None
        return ce, (aux if aux is not None else ce.new_zeros(())), int(batch["attention_mask"].sum())

    def train_step(self) -> dict:
        """One optimiser step over the global batch; returns its losses, tokens, grad norm and lr."""
        d = self.d
        micro, n_targets = self._micro_batches(self.step)
        n_micro = self.micro_per_step
        ce_sum, aux_sum, tokens = torch.zeros((), dtype=torch.float64), 0.0, 0
        for j, idx in enumerate(micro):
            with distributed.no_sync(self.model, sync=j == len(micro) - 1):
                ce, aux, n_tok = self._forward(idx, training=True)
                # Scaled so the gradients, averaged over processes by DDP/FSDP, are those of the
                # whole global batch: sum of CE / target tokens + mean aux loss.
                loss = (ce / max(n_targets, 1) + aux / n_micro) * d.world
                loss.backward()
            self.telemetry.record()
            ce_sum += ce.detach().double().cpu()
            aux_sum += float(aux.detach())
            tokens += n_tok
        if self.layout is not None and not self.layout.experts_fsdp:
            self.layout.reduce_expert_grads()  # once per step, after the last micro-batch (as DDP's all-reduce)
        sums = d.all_sum(torch.tensor([ce_sum.item(), aux_sum, tokens], dtype=torch.float64))
        lm_loss, aux_mean = sums[0].item() / max(n_targets, 1), sums[1].item() / n_micro
        grad_norm = self._clip()
        if not (math.isfinite(lm_loss) and math.isfinite(aux_mean) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(lm_loss + aux_mean) else "gradient norm"
            raise TrainingDiverged(
                f"the {what} became {lm_loss + aux_mean if what == 'loss' else grad_norm} at step {self.step + 1}; "
                f"this step was not applied and nothing was saved; the last good checkpoint is "
                f"{self._last_checkpoint() or 'none (no checkpoint yet)'}; "
                "lower optim.lr, raise schedule.warmup_steps or set optim.grad_clip")
        # The base learning rate (``optim.lr``): the "rest" group, else the first (adapters only).
        lr = next((g["lr"] for g in self.optimizer.param_groups if g["name"] == "rest"),
                  self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"lm_loss": lm_loss, "aux_loss": aux_mean, "tokens": int(sums[2].item()), "ce_sum": sums[0].item(),
                "n_targets": n_targets, "grad_norm": grad_norm, "lr": lr}

    def _clip(self) -> float:
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else float("inf")
        if self.layout is not None:
            return self.layout.clip_grad_norm(self.model, max_norm)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every gradient as one process would hold it, by parameter name, on the main process ({} elsewhere)."""
        return expert_sharding.full_gradients(self.model, self.d, self.layout)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.eval_ds is None or len(self.eval_ds) == 0:
            return None
        cfg, d = self.cfg, self.d
        self.model.eval()
        idx = list(range(len(self.eval_ds)))
        micro = [idx[j:j + cfg.micro_batch_size] for j in range(0, len(idx), cfg.micro_batch_size)]
        if cfg.eval_batches is not None:
            micro = micro[:cfg.eval_batches]
        ce_sum, n = 0.0, 0
        mine = micro[d.rank::d.world]
        # Every process runs the same number of forwards (FSDP gathers weights collectively);
        # a process short of work repeats a batch and discards it.
        for i in range(math.ceil(len(micro) / d.world)):
            part = mine[i] if i < len(mine) else micro[0]
            ce, _, _ = self._forward(part, training=False)
            if i < len(mine):
                ce_sum += float(ce)
                n += sum(self.eval_targets[k] for k in part)
        self.model.train()
        ce_total, n_total = d.all_sum(torch.tensor([ce_sum, n], dtype=torch.float64)).tolist()
        loss = ce_total / max(n_total, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(n_total)}

    # ---- the loop ------------------------------------------------------------------------
    def _last_checkpoint(self) -> str | None:
        found = ckpt.checkpoint_dirs(self.cfg.out)
        return found[-1][1] if found else None

    def save(self, epoch: float, extra: dict) -> str:
        cfg = self.cfg
        # The open logging window's routing counts, over all processes (restored on the main one).
        routing_sums = self.d.all_sum(self.telemetry.sums.clone())
        state = {"seed": cfg.seed, "epoch": epoch, "recipe": dataclasses.asdict(cfg), "routing_sums": routing_sums,
                 "data": self.data_report["train"], **extra}
        if self.experts_subset is not None:
            state["experts_subset"] = self.experts_subset  # a resume reuses the choice as it is
        return ckpt.save_checkpoint(cfg.out, self.step, self.model, self.optimizer, self.scheduler, state,
                                    kind=cfg.checkpoint_kind, tokenizer=self.tokenizer, base_path=cfg.model,
                                    fingerprint=self.fingerprint, keep_last=cfg.keep_last, d=self.d,
                                    layout=self.layout)

    def run(self) -> dict:
        try:
            with _StopFlag() as stop:
                return run_loop(self, stop)
        finally:
            if self.metrics is not None:
                self.metrics.close()


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns a summary (steps, tokens, final losses, checkpoints)."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        summary = trainer.run()
        # gloo aborts a rank whose peer tears the group down while a message is still in flight: leave together.
        trainer.d.barrier()
        return summary
    finally:
        distributed.shutdown()


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


__all__ = ["Trainer", "TrainingDiverged", "epoch_batches", "train"]
