"""The training loop: builds the parts from one Config and runs them.

Per optimizer step: `optim.grad_accum` micro-batches (backbone -> all-gathered embeddings ->
model-parallel classifier with LEAP -> backward), then clip + both optimizers + schedule. Around
that: periodic atomic checkpoints, resume (also on another world size), non-finite loss checks
without a per-step host sync, rank-0 logs, LEAP diagnostics and the backbone export.
`Trainer(cfg, ctx).fit()` is the whole API; launch/train_face.py is a thin wrapper over it.

Resume restores weights, optimizer and scaler states, RNG streams (the classifier's too) and the
position in the epoch, so with the torch loader a stopped-and-resumed run repeats the
uninterrupted loss sequence exactly. The DALI loader resumes with the epoch's unseen images but
in another order (its reader reshuffles), so there the sequences differ after the resume point.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from facetrain import checkpoint as ckpt
from facetrain.config import Config, ConfigError
from facetrain.data.errors import DatasetError
from facetrain.dist import DistContext, raise_if_any_failed, release_group_defaults
from facetrain.engines import build_engine, check_engine
from facetrain.export import export_backbone
from facetrain.logging_utils import RunLogger, format_eta
from facetrain.optim import LRSchedule
from facetrain.threads import apply_threads

# fp16: the grad scaler skips steps with overflowing gradients; only this many consecutive
# non-finite losses stop the run. fp32/bf16 stop at the first one.
FP16_NONFINITE_PATIENCE = 20
# LEAP numbers logged every log_every steps (PartialFC.leap_summary): statistics, the expected
# per-sample noise variance of the applied cloud and of LEAP's (matched controls make them
# equal), and the realised noise of the steps since the previous log.
LOGGED_LEAP = ("pooled_var", "num_perturbed", "noise_var", "target_noise_var", "batch_noise_var",
               "mean_abs_alpha", "active")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


# Bad input a user can fix (config, data files, checkpoints): reported as one message, no
# traceback. Everything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, ckpt.CheckpointError)


class LossMonitor:
    """Accumulates loss statistics on the device so the loop never waits for the host."""

    def __init__(self, device: torch.device, patience: int) -> None:
        self.patience = patience
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.streak, self.streak_start = zero.clone(), zero.clone()  # current non-finite streak
        self.worst, self.worst_start = zero.clone(), zero.clone()  # longest since last check
        self.total = torch.zeros((), device=device)
        self.count = 0

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss)
        self.streak = (self.streak + 1) * bad
        self.streak_start = torch.where(bad & (self.streak == 1), step, self.streak_start)
        longer = self.streak > self.worst
        self.worst_start = torch.where(longer, self.streak_start, self.worst_start)
        self.worst = torch.maximum(self.worst, self.streak)
        self.total = self.total + torch.where(bad, torch.zeros_like(loss), loss.float())
        self.count += 1

    def check(self) -> None:
        """One host sync: raise if the loss was non-finite too often since the last check."""
        worst, first = int(self.worst), int(self.worst_start)
        if worst >= self.patience:
            raise NonFiniteLossError(
                f"the loss became non-finite (NaN/Inf) at step {first}"
                + (f" and stayed so for {worst} steps" if self.patience > 1 else "")
                + "; stopping. The last checkpoint before it is kept: lower optim.lr, raise "
                "schedule.warmup_epochs or optim.grad_clip, or use train.precision=bf16, "
                "then resume")
        self.worst.zero_()

    def mean_and_reset(self) -> float:
        mean = float(self.total) / max(self.count, 1)
        self.total.zero_()
        self.count = 0
        return mean


class Trainer:
    """Builds loader, backbone, classifier, engine, schedule and logger from `cfg`."""

    def __init__(self, cfg: Config, ctx: DistContext) -> None:
        from facetrain.data import build_train_loader
        from facetrain.heads.partial_fc import PartialFC
        from facetrain.models.registry import build_backbone

        self.cfg, self.ctx = cfg, ctx
        self._resume_rep: Optional[Dict[str, Any]] = None
        if not cfg.train.output_dir:       # the same on every rank: each raises it, no collective
            raise ConfigError("train.output_dir is not set: give the run folder "
                              "(train.output_dir=PATH)")
        self.out = Path(cfg.train.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        _seed_everything(cfg.train.seed, ctx.rank)
        # Everything that can fail on bad input is checked here, before the first collective:
        # then one rank reports it and the others stop quietly (no traceback per rank).
        err: Optional[BaseException] = None
        try:
            self.loader = build_train_loader(cfg.data, ctx, cfg.train.seed)
            accum = cfg.optim.grad_accum
            self.steps_per_epoch = len(self.loader) // accum
            if self.steps_per_epoch < 1:
                raise ConfigError(f"{cfg.data.rec}: {len(self.loader)} batches per epoch per "
                                  f"rank is fewer than optim.grad_accum={accum}; lower "
                                  "data.batch_size or optim.grad_accum")
            if self.loader.num_classes < ctx.world_size:
                raise ConfigError(f"{cfg.data.rec} has {self.loader.num_classes} classes, fewer "
                                  f"than the {ctx.world_size} ranks of this run: every rank's "
                                  "classifier block needs at least one class; run on at most "
                                  f"{self.loader.num_classes} ranks")
            check_engine(cfg, ctx)
            damaged: list = []
            resume = ckpt.resolve_resume(cfg.checkpoint.resume, self.ckpt_root, damaged)
            if resume is not None and ctx.is_main:
                # Read once here (and reused by _load) so that a changed model is one message
                # from rank 0 before the first step, not a shape error on every rank.
                self._resume_rep = ckpt.load_replicated(resume, map_location=ctx.device)
                check_same_model(resume, self._resume_rep, self._model_facts())
        except USER_ERRORS as exc:
            err = exc
        raise_if_any_failed(ctx, err)
        total = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        self.backbone_kwargs, build_kwargs = backbone_kwargs(cfg)
        init_note = ""
        try:
            backbone = build_backbone(cfg.model.backbone, **build_kwargs)
            if cfg.model.init_from and resume is None:
                # A new run from someone's weights; a resume of this run's own checkpoints wins.
                self.cfg = cfg = _init_backbone(cfg, backbone)
                init_note = (f"backbone initialised from {cfg.model.init_from} "
                             f"(sha256 {cfg.model.init_from_sha256}); fresh classifier")
            elif cfg.model.init_from:
                init_note = f"model.init_from ignored: resuming from {resume}"
        except USER_ERRORS as exc:
            err = exc
        raise_if_any_failed(ctx, err)
        backbone = backbone.to(ctx.device)
        if cfg.model.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.head = PartialFC(cfg.model.embedding_size, self.loader.class_counts, cfg.head,
                              cfg.leap, ctx, seed=cfg.train.seed, grad_accum=accum)
        self.engine = build_engine(cfg, ctx, backbone, self.head)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, self.steps_per_epoch,
                                   self.total_steps)
        patience = FP16_NONFINITE_PATIENCE if cfg.train.precision == "fp16" else 1
        self.monitor = LossMonitor(ctx.device, patience)
        self.step = self.epoch = self.batch = 0     # batch = micro-batches done in this epoch
        self._saved_step = self._verified_step = -1
        self.log = RunLogger(self.out, ctx.is_main, self.total_steps, cfg.train.tensorboard,
                             rank=ctx.rank)
        for problem in damaged:
            self.log.warning(f"skipping a damaged checkpoint: {problem}")
        if init_note:
            self.log.info(init_note)
        if resume is not None:
            try:
                self._load(resume)
            except BaseException:
                self.log.close()     # its logging handler must not outlive a failed start
                self.engine.close(False)
                raise

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, stop_after: Optional[int] = None,
            after_step: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
        """Train to the end; returns {"step", "epoch", "loss", "export"}. However fit ends, the
        run log is closed (its handler on the `facetrain` logger goes with it) and the engine
        releases what it created (DeepSpeed's own process groups), and the default arguments that
        torch and DeepSpeed bound to the process group at import let go of it
        (`facetrain.dist.release_group_defaults`), so that a process that trained exits cleanly
        from any entry point once the caller destroys its group.

        after_step: called with the step number after each optimizer step, before that step's
        logging and checkpoint; a seam for callers (tests inject faults through it)."""
        self._after_step = after_step
        finished = False
        threads = torch.get_num_threads()
        try:
            self.log.info(apply_threads(self.cfg.train.num_threads, self.cfg.data.num_workers))
            result = self._fit(stop_after)
            finished = True
            return result
        finally:
            torch.set_num_threads(threads)
            self.loader.release_workers()
            self.log.close()
            self.engine.close(finished)
            release_group_defaults(self.ctx.group)

    def _fit(self, stop_after: Optional[int] = None) -> Dict[str, Any]:
        """Train to the end; returns {"step", "epoch", "loss", "export"}.

        stop_after: leave after this optimizer step with a checkpoint, as a preempted job would
        (the schedule still spans the whole run; tests use it for resume equivalence)."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            cfg.save(self.out / "config.yaml")
        self.log.info(f"training {cfg.model.backbone} on {cfg.data.rec}: "
                      f"{self.loader.num_classes} classes, world {ctx.world_size} "
                      f"({ctx.backend or 'no group'}, {ctx.device}), engine {self.engine.name}, "
                      f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
                      f"from step {self.step}")
        self.log.start(self.step)
        last_loss = float("nan")
        self._stop = min(self.total_steps, stop_after or self.total_steps)
        while self.step < self._stop and self.epoch < cfg.train.epochs:
            self._begin_epoch()
            epoch = self.epoch
            last_loss = self._run_epoch(last_loss)
            if self.epoch > epoch:
                self._end_epoch()
        self.monitor.check()
        self._save()
        if self.step < self.total_steps:
            self.log.info(f"stopped at step {self.step} of {self.total_steps} (stop_after)")
            self.log.close()
            return {"step": self.step, "epoch": self.epoch, "loss": last_loss, "export": None}
        self._leap_stats("end")
        export = self._export()
        if cfg.eval.verification and self._verified_step != self.step:
            self._verify()
        self.log.info(f"done: step {self.step}, epoch {self.epoch}, outputs in {self.out}")
        self.log.close()
        return {"step": self.step, "epoch": self.epoch, "loss": last_loss, "export": export}

    def _begin_epoch(self) -> None:
        self.loader.set_epoch(self.epoch)
        self.head.set_epoch(self.epoch)
        leap = self.cfg.leap
        if leap.mode != "off" and self.epoch == leap.start_epoch and self.batch == 0:
            self._leap_stats("start")

    def _run_epoch(self, last_loss: float) -> float:
        cfg = self.cfg
        accum = cfg.optim.grad_accum
        per_epoch = self.steps_per_epoch * accum
        batches = iter(self.loader.iter_from(self.batch))
        samples_per_step = cfg.data.batch_size * self.ctx.world_size * accum
        while self.batch < per_epoch and self.step < self._stop:
            epoch = self.epoch
            lr = self.schedule.apply(self.engine.optimizers, self.step,
                                     scales=(cfg.optim.backbone_lr_scale, 1.0))
            step_loss = torch.zeros((), device=self.ctx.device)
            for k in range(accum):
                images, labels = next(batches)
                if cfg.model.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                step_loss = step_loss + self.engine.micro_step(images, labels, k == accum - 1)
                self.batch += 1
            self.engine.step()
            self.step += 1
            if self.batch >= per_epoch:      # the epoch is done: checkpoints say so from here on
                self.epoch, self.batch = self.epoch + 1, 0
            self.monitor.update(step_loss / accum, self.step)
            self.log.advance(self.step)
            if self._after_step is not None:
                self._after_step(self.step)
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                last_loss = self._log_step(lr, samples_per_step)
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self._save()
            if cfg.eval.verification and cfg.eval.every_steps and \
                    self.step % cfg.eval.every_steps == 0:
                self._verify()
            if self.epoch > epoch:
                break
        return last_loss

    def _log_step(self, lr: float, samples_per_step: int) -> float:
        self.monitor.check()                 # the only per-log host sync of the loop
        loss = self.monitor.mean_and_reset()
        tp = self.log.throughput(self.step, samples_per_step)
        leap = {k: _to_float(v) for k, v in self.head.leap_summary().items() if k in LOGGED_LEAP}
        self.log.info(f"step {self.step}/{self.total_steps} epoch {self.epoch} loss {loss:.4f} "
                      f"lr {lr:.5g} {tp['samples_per_s']:.1f} samples/s "
                      + " ".join(f"leap_{k} {v:.4g}" for k, v in leap.items())
                      + f" eta {format_eta(tp['eta_s'])}")
        self.log.metrics(self.step, {"epoch": self.epoch, "loss": loss, "lr": lr,
                                     "samples_per_s": tp["samples_per_s"],
                                     **{f"leap_{k}": v for k, v in leap.items()}})
        return loss

    def _end_epoch(self) -> None:
        self._save()
        stats = self._gather_class_stats()
        if stats is None or not self.ctx.is_main:
            return
        mean, var, valid, counts = stats
        if not valid.any():                  # leap.mode=off: the classifier tracks no angles
            return
        # The frequent classes are the paper's "head" classes; the metric names keep its word.
        frequent = counts > self.cfg.leap.head_threshold
        row, said = {}, []
        for name, mask in (("head", frequent & valid), ("tail", ~frequent & valid)):
            if mask.any():
                row[f"angular_var_{name}"] = float(var[mask].mean())
                said.append(f"{name} {row[f'angular_var_{name}']:.4g}")
            else:        # e.g. no class has <= leap.head_threshold images: there is no tail
                said.append(f"{name}: no {name} classes with statistics "
                            f"(leap.head_threshold={self.cfg.leap.head_threshold})")
        self.log.metrics(self.step, {"epoch": self.epoch, **row}, tb_prefix="leap")
        self.log.info(f"epoch {self.epoch} done: angular variance " + ", ".join(said))

    # ---- checkpoints ----------------------------------------------------------------------
    def _save(self) -> None:
        """One checkpoint: the engine's and the head's own states plus the trainer's position
        and random streams (facetrain/checkpoint.py writes and verifies the files)."""
        if self._saved_step == self.step:
            return
        self.monitor.check()                 # never write a checkpoint after a bad loss
        engine = self.engine.state_dict()
        replicated = None
        if self.ctx.is_main:
            replicated = {**engine["replicated"], "step": self.step, "epoch": self.epoch,
                          "batch": self.batch, "world_size": self.ctx.world_size,
                          "config": self.cfg.to_dict(),
                          "num_classes": self.loader.num_classes,
                          "global_batch": self.cfg.data.batch_size * self.ctx.world_size}
        rank_part = {**engine["shard"], "head": self.head.state_dict(),
                 "rng": ckpt.rng_state(self.ctx.device), "rank": self.ctx.rank}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, replicated, rank_part, self.ctx,
                                    self.cfg.checkpoint.keep_last)
        self._saved_step = self.step
        self.log.info(f"checkpoint {path}")

    def _load(self, path: Path) -> None:
        """Resume from checkpoint `path`, also one saved by another number of ranks: the
        engine and the head re-split their per-class state themselves."""
        rep = self._resume_rep
        if rep is None:
            rep = ckpt.load_replicated(path, map_location=self.ctx.device)
        self._resume_rep = None
        files = ckpt.SavedStates(path, lambda f: f)
        world = self.ctx.world_size
        self.engine.load_state_dict(files.view(lambda f: {"replicated": rep, "shard": f}), world)
        self.head.load_state_dict(files.view(lambda f: f["head"]), world)
        self.step, self.epoch, self.batch = rep["step"], rep["epoch"], rep["batch"]
        self._saved_step = self.step
        old_world = files.world_size
        if old_world == world:
            ckpt.set_rng_state(files[self.ctx.rank]["rng"], self.ctx.device)
        else:
            _seed_everything(self.cfg.train.seed + 7919 * self.step, self.ctx.rank)
            # Keep the position in global samples, not per-rank batches.
            accum = self.cfg.optim.grad_accum
            consumed = self.batch * rep.get("global_batch", self.cfg.data.batch_size * old_world)
            new_global = self.cfg.data.batch_size * world
            self.batch = consumed // new_global // accum * accum
        self.log.info(f"resumed from {path} (step {self.step}, epoch {self.epoch}, batch "
                      f"{self.batch}, saved by {old_world} ranks, now {world})")

    def _model_facts(self) -> Dict[str, Any]:
        """What a checkpoint's tensors are shaped by (see check_same_model)."""
        return {"model.backbone": self.cfg.model.backbone,
                "model.embedding_size": self.cfg.model.embedding_size,
                "data.image_size": "x".join(map(str, self.cfg.data.hw)),
                "the number of classes (of data.rec)": self.loader.num_classes}

    # ---- diagnostics, export, evaluation -------------------------------------------------
    def _gather_class_stats(self) -> Optional[tuple]:
        """(mean, var, valid, class_counts) over ALL classes on rank 0 (None elsewhere)."""
        mean, var, valid = (t.detach().cpu().numpy() for t in self.head.class_stats())
        local = ((self.head.start, self.head.end), mean, var, valid)
        parts = [local]
        if self.ctx.distributed:
            parts = [None] * self.ctx.world_size
            # Objects, not tensors: class blocks are uneven, and this runs once per epoch.
            dist.all_gather_object(parts, local, group=self.ctx.group)
        if not self.ctx.is_main:
            return None
        parts.sort(key=lambda p: p[0][0])
        cat = [np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)]
        return cat[0], cat[1], cat[2].astype(bool), np.asarray(self.loader.class_counts)

    def _leap_stats(self, tag: str) -> None:
        stats = self._gather_class_stats()
        if stats is None:
            return
        mean, var, valid, counts = stats
        np.savez(self.out / f"leap_stats_{tag}.npz", mean=mean, var=var, valid=valid,
                 class_counts=counts, epoch=self.epoch, step=self.step,
                 head_threshold=self.cfg.leap.head_threshold)

    def _export(self) -> Optional[Dict[str, str]]:
        if not self.ctx.is_main:
            return None
        paths = export_backbone(self.engine.backbone, self.cfg.model.backbone,
                                self.backbone_kwargs, self.out / "export", self.cfg.data.hw)
        self.log.info("exported " + ", ".join(str(p) for p in paths.values()))
        return {k: str(v) for k, v in paths.items()}

    def _verify(self) -> None:
        """Verification accuracy on each `eval.verification` pack (rank 0; others wait)."""
        self._verified_step = self.step
        if self.ctx.is_main:
            from facetrain.eval.embed import extract_features
            from facetrain.eval.verification import evaluate_pack_features, load_pack

            model = self.engine.backbone
            was_training = model.training
            model.eval()
            for pack in self.cfg.eval.verification:
                bins, issame = load_pack(pack)
                feats = extract_features(model, bins, batch_size=self.cfg.eval.batch_size,
                                         flip=True, device=self.ctx.device,
                                         image_size=self.cfg.data.hw, progress=False)
                res = evaluate_pack_features(feats, issame)
                name = Path(pack).stem
                self.log.info(f"verification {name} step {self.step}: accuracy "
                              f"{res['accuracy_mean']:.4f} +- {res['accuracy_std']:.4f}")
                self.log.metrics(self.step, {f"{name}_acc": res["accuracy_mean"]}, "val")
            model.train(was_training)
        if self.ctx.distributed:
            dist.barrier(group=self.ctx.group)


def saved_model_facts(rep: Dict[str, Any]) -> Dict[str, Any]:
    """Trainer._model_facts of the run that saved the replicated checkpoint part `rep` (the
    number of classes only where it was recorded, since this check exists)."""
    saved = rep.get("config") or {}
    model, data = saved.get("model", {}), saved.get("data", {})
    facts: Dict[str, Any] = {}
    if "backbone" in model:
        facts["model.backbone"] = model["backbone"]
    if "embedding_size" in model:
        facts["model.embedding_size"] = model["embedding_size"]
    if "image_size" in data:
        h = data["image_size"]
        facts["data.image_size"] = f"{h}x{data.get('image_width') or h}"
    if "num_classes" in rep:
        facts["the number of classes (of data.rec)"] = rep["num_classes"]
    return facts


def check_same_model(path: Path, rep: Dict[str, Any], now: Dict[str, Any]) -> None:
    """Raise CheckpointError naming the first model fact (backbone, embedding size, image size,
    number of classes) in which checkpoint `path` differs from this run: its tensors could not
    be loaded, and the shape error would come late and once per rank."""
    saved = saved_model_facts(rep)
    for field, value in now.items():
        if field in saved and saved[field] != value:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not fit this run: {field} is {saved[field]} there and "
                f"{value} here; resume with the same model, or start fresh with "
                "checkpoint.resume=none (or another train.output_dir)")


def backbone_kwargs(cfg: Config) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the kwargs an export records, the kwargs the trainer builds with): the ViT options only
    when set (null = the backbone's default), activation checkpointing only for training."""
    kwargs: Dict[str, Any] = {"embedding_size": cfg.model.embedding_size,
                              "dropout": cfg.model.dropout, "image_size": _image_size(cfg)}
    for key in ("mask_ratio", "drop_path"):
        if getattr(cfg.model, key) is not None:
            kwargs[key] = getattr(cfg.model, key)
    build = dict(kwargs)
    if cfg.model.activation_checkpointing:
        build["activation_checkpointing"] = True
    return kwargs, build


def _init_backbone(cfg: Config, backbone: torch.nn.Module) -> Config:
    """Load `model.init_from` into `backbone`; the config with the file read and its sha256
    recorded (model.init_from, model.init_from_sha256), as config.yaml then shows."""
    from facetrain.models.init_from import init_from_path
    source, _ = init_from_path(backbone, cfg.model.init_from, cfg.model.backbone,
                               cfg.model.init_allow_missing_final, cfg.model.init_from_sha256)
    model = dataclasses.replace(cfg.model, init_from=str(source.path.resolve()),
                                init_from_sha256=source.sha256)
    return dataclasses.replace(cfg, model=model)


def _image_size(cfg: Config) -> Any:
    """The backbone's image_size kwarg: one side when square (as exports have always said),
    else [H, W]."""
    h, w = cfg.data.hw
    return h if h == w else [h, w]


def _to_float(v: Any) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def _seed_everything(seed: int, rank: int) -> None:
    """Different streams per rank (dropout, etc.); the classifier seeds its own."""
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)

