"""The fine-tuning loop: SGD, masks kept, best-on-validation, exact stop + resume, torchrun."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import CheckpointError, ConfigError, StateDictMismatchError, TrainingError, TrainingInterrupted
from ..layers import keep_pruned_zero, masked_layers, zero_pruned_
from . import dist as D
from . import io as IO
from .config import TrainConfig, TrainResult
from .evaluation import evaluate_sums
from .loaders import check_labels, dataset_len, epoch_plan, logits_of, split_batch, train_loader
from .state import SignalGuard, capture_rng, nonfinite_tensors, restore_rng, seed_everything, to_cpu

Callback = Callable[[dict[str, Any]], None]

BEST_NAME = "best.safetensors"
LAST_NAME = "last.pt"
LOG_NAME = "train_log.jsonl"


def train(model: nn.Module, train_set: Dataset, val_set: Dataset, config: TrainConfig, out_dir: Path, *,
          teacher: nn.Module | None = None, resume: bool = False, callback: Callback | None = None) -> TrainResult:
    """Fine-tune ``model`` (masked layers keep pruned connections at exactly zero).

    One SGD optimizer for the whole run, LR set per epoch by ``config.schedule``, model
    selection on ``val_set`` (top-1, ties to the lower loss). Writes, on rank 0 only,
    ``out_dir/best.safetensors``, ``out_dir/last.pt`` (resume state after every epoch and on
    SIGINT/SIGTERM) and ``out_dir/train_log.jsonl``. With ``resume=True`` the run continues
    from ``last.pt`` to the same result as an uninterrupted run (bitwise on CPU).
    ``teacher`` is used only when ``config.distill`` is set. Progress goes to ``callback``
    (rank 0 only). The model returns to its device and mode, holding the best weights.

    Raises TrainingInterrupted (exit_code 130/143) on a signal, TrainingError on a
    non-finite loss or a failed write, ConfigError / DataError / CheckpointError on bad input.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.distill and teacher is None:
        raise ConfigError("distill is on but no teacher model was given; pass the unpruned model as teacher "
                          "or turn distillation off")
    return _Run(model, train_set, val_set, config, Path(out_dir), teacher if config.distill else None,
                resume, callback).execute()


class _Run:
    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset, cfg: TrainConfig, out_dir: Path,
                 teacher: nn.Module | None, resume: bool, callback: Callback | None) -> None:
        self.module, self.train_set, self.val_set, self.cfg = model, train_set, val_set, cfg
        self.teacher, self.resume, self.out_dir = teacher, resume, out_dir
        self.n_train = dataset_len(train_set, "training set")
        dataset_len(val_set, "validation set")
        self.ctx = D.setup()
        self.callback = callback if self.ctx.is_main else None
        self.best_path, self.last_path, self.log_path = (out_dir / BEST_NAME, out_dir / LAST_NAME, out_dir / LOG_NAME)
        self.steps, self.drop_last = epoch_plan(self.n_train, self.ctx, cfg.batch_size, cfg.max_steps_per_epoch)
        self.epoch, self.step = 0, 0
        self.accum = _fresh_accum()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.resumed_from: dict[str, int] | None = None

    # ----------------------------------------------------------------------------- events
    def emit(self, kind: str, **data: Any) -> None:
        if self.callback is not None:
            self.callback({"kind": kind, **data})

    # ------------------------------------------------------------------------------ setup
    def _load_resume_state(self) -> dict[str, Any] | None:
        on_main = self.ctx.is_main
        if on_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        D.barrier(self.ctx)
        exists = self.last_path.exists()
        if not self.resume:
            if exists:
                raise ConfigError(f"{self.out_dir} already holds a training run ({LAST_NAME}); resume it, "
                                  "or train into an empty folder")
            return None
        if not exists:
            raise ConfigError(f"nothing to resume: {self.last_path} does not exist; start without resume")
        state = IO.load_state(self.last_path)
        saved, now = state.get("config", {}), self.cfg.to_dict()
        diffs = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k != "workers" and saved.get(k) != v]
        if diffs:
            raise ConfigError(f"the run in {self.out_dir} was started with other settings ({'; '.join(diffs)}); "
                              "resume with the same settings, or start a new run in another folder")
        if state.get("world_size") != self.ctx.world_size:
            raise ConfigError(f"the run was started with {state.get('world_size')} processes, now "
                              f"{self.ctx.world_size}; resume with the same --nproc_per_node")
        masks = {k: m.connection_mask.bool().cpu() for k, m in masked_layers(self.module).items()}
        saved_masks = state.get("masks", {})
        if set(masks) != set(saved_masks) or any(not torch.equal(masks[k], saved_masks[k]) for k in masks):
            raise CheckpointError(f"the model's connection masks differ from those of the run in {self.out_dir}; "
                                  "rebuild the model from the same plan, or start a new run")
        return state

    def _apply_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        try:
            self.module.load_state_dict(state["model"], strict=True)
        except RuntimeError as e:
            raise StateDictMismatchError(f"{self.last_path} does not fit the model: {e}; resume with the same "
                                         "architecture and plan") from e
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"the optimizer state in {self.last_path} does not fit the model: {e}") from e
        restore_rng(state["rng"][self.ctx.rank])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.accum = dict(state["accum"])
        self.history = list(state["history"])
        self.best = state["best"]
        self.resumed_from = {"epoch": self.epoch + 1, "step": self.step}

    # ---------------------------------------------------------------------------- writing
    def _write(self, path: Path, fn: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                fn()
            except OSError as e:
                raise TrainingError(
                    f"could not write {path}: {e.strerror or e}; the previous {path.name} is intact. "
                    "Free disk space (or fix the folder's permissions) and resume the run"
                ) from e
        D.on_main(self.ctx, guarded)

    def _check_finite(self, optimizer: torch.optim.Optimizer) -> None:
        bad = nonfinite_tensors(self.module, optimizer)
        if bad:
            raise TrainingError(f"non-finite values in {', '.join(bad[:5])} at epoch {self.epoch + 1}, step "
                                f"{self.step}; nothing was saved. Lower the learning rate (--lr, now {self.cfg.lr})")

    def _save_last(self, optimizer: torch.optim.Optimizer) -> None:
        self._check_finite(optimizer)
        rng = D.gather_objects(self.ctx, capture_rng())
        if not self.ctx.is_main:
            return D.on_main(self.ctx, lambda: None)
        state = {
            "format": IO.STATE_FORMAT, "version": IO.STATE_VERSION,
            "config": self.cfg.to_dict(), "world_size": self.ctx.world_size,
            "epoch": self.epoch, "step": self.step, "steps_per_epoch": self.steps,
            "model": IO.weights_dict(self.module), "optimizer": to_cpu(optimizer.state_dict()),
            "masks": {k: m.connection_mask.bool().cpu() for k, m in masked_layers(self.module).items()},
            "rng": rng, "accum": dict(self.accum), "history": list(self.history), "best": self.best,
        }
        self._write(self.last_path, lambda: IO.atomic_save(state, self.last_path))

    def _interrupt(self, optimizer: torch.optim.Optimizer, signum: int) -> None:
        self._save_last(optimizer)
        name = signal.Signals(signum).name
        self.emit("interrupted", signal=name, epoch=self.epoch + 1, step=self.step, path=str(self.last_path))
        raise TrainingInterrupted(
            signum, f"stopped by {name} at epoch {self.epoch + 1}, step {self.step}; the resume state is in "
                    f"{self.last_path}: run again with resume to continue", checkpoint=str(self.last_path))

    # ------------------------------------------------------------------------------- loop
    def execute(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        state = self._load_resume_state()
        model, teacher = self.module, self.teacher
        orig_device = next((p.device for p in model.parameters()), ctx.device)
        modes = {m: m.training for m in model.modules()}
        t_modes = {m: m.training for m in teacher.modules()} if teacher is not None else {}
        t_device = next((p.device for p in teacher.parameters()), ctx.device) if teacher is not None else None
        model.to(ctx.device)
        if teacher is not None:
            teacher.to(ctx.device).eval()
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
        hook = keep_pruned_zero(optimizer, model)
        zero_pruned_(model)
        net: nn.Module = model
        try:
            if state is not None:
                self._apply_state(state, optimizer)
                del state
            else:
                seed_everything(cfg.seed + ctx.rank)
                self._write(self.log_path, lambda: IO.write_jsonl(self.log_path, []))
            if self.resumed_from is not None:  # the log may hold a torn or extra line: rewrite it
                self._write(self.log_path, lambda: IO.write_jsonl(self.log_path, self.history))
            if ctx.distributed:  # after the structure is final: the masked model
                net = nn.parallel.DistributedDataParallel(
                    model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
            self.emit("train_start", epochs=cfg.epochs, steps=self.steps, device=str(ctx.device),
                      world_size=ctx.world_size, resumed_from=self.resumed_from, out_dir=str(self.out_dir))
            with SignalGuard() as guard:
                while self.epoch < cfg.epochs:
                    self._run_epoch(net, optimizer, guard)
            model.load_state_dict(self.best_weights if self.best_weights is not None
                                  else IO.load_weights(self.best_path))
            zero_pruned_(model)
            assert self.best is not None and self.history
            self.emit("train_end", best=self.best, final=self.history[-1])
            return TrainResult(best=self.best, final=self.history[-1], history=list(self.history),
                               best_weights=self.best_path, last_state=self.last_path, log=self.log_path,
                               resumed_from=self.resumed_from)
        finally:
            hook.remove()
            del net
            model.to(orig_device)
            for m, t in modes.items():
                m.train(t)
            if teacher is not None:
                teacher.to(t_device)
                for m, t in t_modes.items():
                    m.train(t)

    def _run_epoch(self, net: nn.Module, optimizer: torch.optim.Optimizer, guard: SignalGuard) -> None:
        cfg, ctx, e = self.cfg, self.ctx, self.epoch
        lr = cfg.lr_at(e)
        for g in optimizer.param_groups:
            g["lr"] = lr
        self.emit("epoch_start", epoch=e + 1, epochs=cfg.epochs, lr=lr, steps=self.steps, step=self.step)
        t_epoch = time.perf_counter()
        if self.step < self.steps:
            net.train()
            loader = train_loader(self.train_set, ctx, batch_size=cfg.batch_size, seed=cfg.seed, epoch=e,
                                  skip_batches=self.step, drop_last=self.drop_last, workers=cfg.workers)
            it = iter(loader)
            while self.step < self.steps:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except Exception:
                    if guard.signum is not None:  # a worker killed by the same signal: stop cleanly
                        self._interrupt(optimizer, guard.signum)
                    raise
                stop = self._step(net, optimizer, batch, lr, guard)
                self.accum["train_seconds"] += time.perf_counter() - t0
                self.emit("batch", epoch=e + 1, epochs=cfg.epochs, step=self.step, steps=self.steps, lr=lr,
                          loss=self._last_loss, acc=self._last_acc, images=int(self.accum["n"]),
                          images_per_s=self.accum["n"] / max(self.accum["train_seconds"], 1e-9))
                if not ctx.distributed:
                    stop = guard.signum
                if stop:
                    self.accum["seconds"] += time.perf_counter() - t_epoch
                    self._interrupt(optimizer, stop)
            del it, loader
        D.sync_buffers(ctx, self.module)  # as DDP's next forward would: validate and save rank 0's stats
        vloss, c1, c5, vn = evaluate_sums(net, self.val_set, batch_size=cfg.batch_size, workers=cfg.workers)
        seconds = self.accum["seconds"] + time.perf_counter() - t_epoch
        n = max(self.accum["n"], 1.0)
        record = {
            "epoch": e + 1, "epochs": cfg.epochs, "lr": lr, "steps": self.steps,
            "train_loss": self.accum["loss_sum"] / n, "train_acc": self.accum["correct"] / n,
            "train_images": int(self.accum["n"]),
            "val_loss": vloss / vn, "val_top1": c1 / vn, "val_top5": c5 / vn, "val_n": vn,
            "seconds": seconds, "images_per_s": self.accum["n"] / max(self.accum["train_seconds"], 1e-9),
        }
        b = self.best
        improved = b is None or record["val_top1"] > b["val_top1"] or (
            record["val_top1"] == b["val_top1"] and record["val_loss"] < b["val_loss"])
        record["is_best"] = improved
        self._check_finite(optimizer)
        if improved:
            self.best = record
            self.best_weights = IO.weights_dict(self.module)
            meta = {"format": "sgcompress-weights", "epoch": str(e + 1), "val_top1": repr(record["val_top1"])}
            self._write(self.best_path, lambda: IO.save_weights(self.best_weights, self.best_path, meta))
            self.emit("checkpoint", which="best", path=str(self.best_path), epoch=e + 1)
        self.history.append(record)
        self._write(self.log_path, lambda: IO.append_jsonl(self.log_path, record))
        self.epoch, self.step, self.accum = e + 1, 0, _fresh_accum()
        self._save_last(optimizer)
        self.emit("checkpoint", which="last", path=str(self.last_path), epoch=e + 1)
        self.emit("epoch_end", **record)
        signum = guard.signum or 0
        if ctx.distributed:
            signum = _decode_signal(D.all_sum(ctx, _encode_signal(guard.signum)))
        if signum:
            self._interrupt(optimizer, signum)

    def _step(self, net: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, lr: float,
              guard: SignalGuard) -> int:
        """One optimizer step; returns the signal number all ranks agree to stop on (0 = go on)."""
        cfg, ctx = self.cfg, self.ctx
        x, y_cpu = split_batch(batch)
        x = x.to(ctx.device, non_blocking=True)
        logits = logits_of(net(x))
        check_labels(y_cpu, logits.shape[1])
        y = y_cpu.to(ctx.device, non_blocking=True)
        t_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = logits_of(self.teacher(x))
        loss = training_loss(logits, y, cfg, t_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bs = float(y.numel())
        local = torch.stack([loss.detach().double() * bs, (logits.detach().argmax(1) == y).sum().double(),
                             (~torch.isfinite(loss.detach())).double()]).cpu()
        stats = D.all_sum(ctx, torch.cat([local, torch.tensor([bs], dtype=torch.float64),
                                          _encode_signal(guard.signum)]))
        loss_sum, correct, nonfinite, n = stats[:4].tolist()
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"the training loss is not finite (value {loss.item()}) at epoch {self.epoch + 1}, step "
                f"{self.step + 1}; no checkpoint was written for it (the last good resume state, if any, is "
                f"{self.last_path}). Lower the learning rate (--lr, now {lr:g}) or check the data for NaN/Inf")
        optimizer.step()
        self.step += 1
        self.accum["loss_sum"] += loss_sum
        self.accum["correct"] += correct
        self.accum["n"] += n
        self._last_loss, self._last_acc = loss_sum / n, correct / n
        return _decode_signal(stats[4:])


def training_loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                  teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (with ``cfg.label_smoothing``), or with a teacher's logits
    ``(1-w)*CE + w*T^2*KL(softmax(t/T) || softmax(s/T))`` (w, T from ``cfg``)."""
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return ce
    T, w = cfg.distill_temperature, cfg.distill_weight
    kd = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - w) * ce + w * T * T * kd


def _fresh_accum() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct": 0.0, "n": 0.0, "train_seconds": 0.0, "seconds": 0.0}


def _encode_signal(signum: int | None) -> torch.Tensor:
    return torch.tensor([float(signum == signal.SIGINT), float(signum == signal.SIGTERM)], dtype=torch.float64)


def _decode_signal(v: torch.Tensor) -> int:
    sigint, sigterm = v.tolist()
    return int(signal.SIGINT) if sigint else int(signal.SIGTERM) if sigterm else 0
