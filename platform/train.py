"""The pretraining loop: one obvious loop over steps, resumable from the last checkpoint."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import fsspec
import torch
import torch.distributed as dist
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dinoforge.checkpoint import (Checkpointer, checkpoint_bytes, checkpoint_digest, latest_checkpoint, load_model_weights,
                                  resolve_checkpoint)
from dinoforge.config import Config, to_dict
from dinoforge.data import open_source
from dinoforge.data.storage import join
from dinoforge.data.stream import MASK_STREAM, RANK_STREAM, SkipLedger, multicrop_loader, sample_seed
from dinoforge.distributed import PRECISIONS, World, close_world, init_world, shard_model
from dinoforge.telemetry import Telemetry
from dinoforge.model.augment import MultiCropAugmentation
from dinoforge.model.masking import masked_rows, sample_masks
from dinoforge.model.optim import apply_schedules, param_groups
from dinoforge.model.schedules import CosineSchedule, sqrt_scaled_lr
from dinoforge.export import backbone_from_config, load_teacher
from dinoforge.model.distill import DistillMetaArch
from dinoforge.model.ssl import SSLMetaArch

if TYPE_CHECKING:
    from dinoforge.lineage import Lineage

log = logging.getLogger("dinoforge.train")


def build_meta_arch(cfg: Config) -> SSLMetaArch | DistillMetaArch:
    """Self-supervised pretraining, or distillation when ``distill.teacher`` is set."""
    if cfg.distill.teacher:
        teacher, dino_head, ibot_head = load_teacher(cfg)
        student = backbone_from_config(cfg.model, cfg.crops.global_crops_size, drop_path_rate=0.0)
        return DistillMetaArch(student, teacher, dino_head, ibot_head, cfg.objective)
    make = partial(backbone_from_config, cfg.model, cfg.crops.global_crops_size)
    return SSLMetaArch(make, cfg.model.drop_path_rate, cfg.objective)


@dataclass(frozen=True)
class Schedules:
    """Per-step values of the official recipe; an "epoch" is ``optim.epoch_length`` steps."""

    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, cfg: Config, total_batch_size: int) -> "Schedules":
        o, t, epoch = cfg.optim, cfg.teacher, cfg.optim.epoch_length
        total = cfg.total_steps
        lr = sqrt_scaled_lr(o.base_lr, total_batch_size) if o.scaling_rule == "sqrt_wrt_1024" else o.base_lr
        return cls(
            lr=CosineSchedule(lr, o.min_lr, total, warmup_iters=o.warmup_epochs * epoch),
            weight_decay=CosineSchedule(o.weight_decay, o.weight_decay_end, total),
            momentum=CosineSchedule(t.momentum_teacher, t.final_momentum_teacher, total)
            if cfg.distill.ema_momentum is None or not cfg.distill.teacher
            else CosineSchedule(cfg.distill.ema_momentum, cfg.distill.ema_momentum, total),  # the spare EMA's
            teacher_temp=CosineSchedule(
                t.teacher_temp,
                t.teacher_temp,
                total,
                warmup_iters=min(t.warmup_teacher_temp_epochs * epoch, total),
                start_warmup_value=t.warmup_teacher_temp,
            ),
            freeze_last_layer_steps=o.freeze_last_layer_epochs * epoch,
        )

    def last_layer_lr(self, step: int) -> float:
        return 0.0 if step < self.freeze_last_layer_steps else self.lr(step)


def _unique_modules(modules) -> list[torch.nn.Module]:
    seen, unique = set(), []
    for module in modules:
        if id(module) not in seen:
            seen.add(id(module))
            unique.append(module)
    return unique


def train_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, batch: dict, masks: torch.Tensor, values: dict,
               clip_grad: float, autocast_dtype: torch.dtype | None = None,
               mask_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Forward (under autocast when ``autocast_dtype`` is set), backward with gradient clipping
    per student module, AdamW, EMA teacher. Returns the detached losses (tensors: reading them
    would synchronise a GPU). ``mask_rows``: see ``SSLMetaArch.forward``."""
    device_type = batch["global_crops"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss, parts = model(batch["global_crops"], batch.get("local_crops"), masks, values["teacher_temp"], mask_rows)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        for module in _unique_modules(model.student.values()):
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
    optimizer.step()
    model.update_teacher(values["momentum"])
    return {"loss": loss.detach(), **parts}


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


class MetricsLog:
    """``metrics.jsonl`` under the run directory, written by rank 0. Object stores cannot
    append, so there the whole file is rewritten at each log step."""

    def __init__(self, output: str, enabled: bool) -> None:
        self.fs, self.path = fsspec.core.url_to_fs(join(output, "metrics.jsonl"))
        self.enabled, self.local = enabled, self.fs.protocol in ("file", ("file", "local"))
        self.lines: list[str] = []
        if enabled and not self.local and self.fs.exists(self.path):
            self.lines = self.fs.cat_file(self.path).decode().splitlines(keepends=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self.local:
            with self.fs.open(self.path, "a") as handle:
                handle.write(line)
        else:
            self.lines.append(line)
            self.fs.pipe_file(self.path, "".join(self.lines).encode())


def _global_mean(values: dict[str, torch.Tensor], world: World) -> dict[str, float]:
    if not world.distributed:
        return {k: v.item() for k, v in values.items()}
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return {k: (v / world.world_size).item() for k, v in zip(values, stacked)}


def _gather_skipped(pending: list[dict], world: World) -> list[dict]:
    if not world.distributed:
        return pending
    gathered: list[list[dict]] = [[] for _ in range(world.world_size)]
    dist.all_gather_object(gathered, pending)
    return [item for items in gathered for item in items]


def prepare_model(model: SSLMetaArch | DistillMetaArch, cfg: Config, world: World) -> None:
    """The step's implementation levers (fused loss, compiled blocks, activation
    checkpointing) and, on several ranks, FSDP2 sharding."""
    model.fused_loss, model.compile_losses = cfg.train.fused_loss, cfg.train.compile
    for backbone in (model.student["backbone"], model.teacher["backbone"]):
        backbone.activation_checkpointing = cfg.train.activation_checkpointing
        if cfg.train.compile:
            for block in backbone.blocks:
                # Static shapes: the teacher's and the student's token counts differ, and
                # automatic dynamic shapes would trade both for one slower symbolic graph.
                block.compile(dynamic=False)
    if world.world_size > 1:
        shard_model(model, world, cfg.train.precision)


def build_optimizer(model: SSLMetaArch | DistillMetaArch, cfg: Config) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        fused=cfg.train.fused_optimizer or None,
    )


def pretrain(cfg: Config, output: str, max_steps: int | None = None, progress: bool = True) -> dict:
    """Trains until ``cfg.total_steps`` (or ``max_steps`` in this invocation's total),
    resuming from the newest committed checkpoint under ``output``; under torchrun every rank
    runs this. Returns a summary."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    world = init_world()
    try:
        return _pretrain(cfg, output, max_steps, progress and world.is_main, world)
    finally:
        if owns_group:
            close_world()


def _record_inputs(lineage: Lineage, cfg: Config, dataset_digest: str) -> None:
    from dinoforge.lineage import digest_uri

    lineage.params(to_dict(cfg))
    kind, _, uri = cfg.data.dataset.partition(":")
    manifest = kind == "manifest"
    lineage.input(uri if manifest else cfg.data.dataset, dataset_digest, name="train_data", kind="manifest" if manifest else "dataset")
    if cfg.distill.teacher:
        lineage.input(cfg.distill.teacher, digest_uri(cfg.distill.teacher), name="teacher", kind="weights")
    if cfg.train.init_from:
        init = resolve_checkpoint(cfg.train.init_from)
        lineage.input(init, checkpoint_digest(init), name="init_from", kind="checkpoint")


def _pretrain(cfg: Config, output: str, max_steps: int | None, progress: bool, world: World) -> dict:
    stage = "distill" if cfg.distill.teacher else "pretrain"
    telemetry = Telemetry(stage, rank=world.rank)
    # Imported here: MLflow takes ~2 s to import and building or timing a step (dinoforge bench,
    # also where MLflow is not installed) does not need it.
    from dinoforge.lineage import stage_lineage

    lineage = stage_lineage(stage, output, enabled=world.is_main)
    try:
        with lineage:
            summary = _train(cfg, output, max_steps, progress, world, telemetry, lineage)
            lineage.artifact(join(output, "config.yaml"))  # the resolved config, as the run used it
            if summary["last_checkpoint_uri"]:
                uri = summary["last_checkpoint_uri"]
                lineage.output(uri, checkpoint_digest(uri), name="checkpoint", kind="checkpoint")
        return summary
    finally:
        telemetry.close()


def _train(cfg: Config, output: str, max_steps: int | None, progress: bool, world: World, telemetry: Telemetry,
           lineage: Lineage) -> dict:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    device, batch_size = world.device, cfg.train.batch_size_per_gpu
    model = build_meta_arch(cfg).to(device)
    model.train()
    prepare_model(model, cfg, world)
    optimizer = build_optimizer(model, cfg)
    global_batch = batch_size * world.world_size
    schedules = Schedules.from_config(cfg, global_batch)
    checkpointer = Checkpointer(output, world, cfg.train.keep_checkpoints, cfg.train.async_checkpoint,
                                lambda op, seconds, uri: telemetry.checkpoint(op, seconds, checkpoint_bytes(uri)))

    source = open_source(cfg.data.dataset, cfg.data)
    dataset_digest = source.manifest.digest if hasattr(source, "manifest") else cfg.data.dataset
    _record_inputs(lineage, cfg, dataset_digest)
    start_step, start_position, skips = 0, 0, SkipLedger()
    # Stochastic depth differs per rank; a resume at the same world size restores these streams.
    torch.manual_seed(sample_seed(cfg.train.seed, world.rank, RANK_STREAM))
    resumed_from = latest_checkpoint(output)
    if resumed_from:
        trainer = checkpointer.load(resumed_from, model, optimizer)
        changed = _changed_keys(trainer["config"], to_dict(cfg))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
        start_step, start_position = trainer["step"], trainer["data"]["position"]
        skips.load_state_dict(trainer["data"]["skipped"])
        if trainer["data"]["dataset"] != dataset_digest:
            log.warning("resuming on a different dataset (%s, checkpoint: %s): the sample stream will not continue exactly",
                        dataset_digest, trainer["data"]["dataset"])
        if trainer["world_size"] != world.world_size:
            log.warning("resuming %d-rank checkpoint on %d ranks: global batch %d -> %d",
                        trainer["world_size"], world.world_size, trainer["world_size"] * batch_size, global_batch)
            torch.manual_seed(sample_seed(cfg.train.seed + start_step, world.rank, RANK_STREAM))
        log.info("resumed from %s at step %d", resumed_from, start_step)
        lineage.input(resumed_from, checkpoint_digest(resumed_from), name="resumed_from", kind="checkpoint")
    elif cfg.train.init_from:
        source_uri = resolve_checkpoint(cfg.train.init_from)
        load_model_weights(source_uri, model)
        log.info("initialised the weights from %s", source_uri)

    if world.is_main:
        fs, root = fsspec.core.url_to_fs(output)
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(join(root, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    metrics = MetricsLog(output, world.is_main)

    end_step = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    loader = multicrop_loader(
        source, MultiCropAugmentation(cfg.crops), batch_size, cfg.train.seed, start_position, cfg.data.num_workers,
        world.rank, world.world_size,
    )
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    n_global_images = 2 * batch_size
    # FSDP casts the sharded parameters itself; a single process uses autocast instead.
    autocast_dtype = PRECISIONS[cfg.train.precision] if world.world_size == 1 else None
    last_saved, last_uri, record, pending_skips = start_step, resumed_from, {}, []
    columns = [TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("steps", total=end_step, completed=start_step, status="")
        batches = iter(loader)
        tick, window_start = time.perf_counter(), start_step
        for step in range(start_step, end_step):
            step_started = time.perf_counter()
            batch = next(batches)
            data_seconds = time.perf_counter() - step_started
            pending_skips += batch.pop("skipped")
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            mask_seed = sample_seed(sample_seed(cfg.train.seed, step, MASK_STREAM), world.rank, MASK_STREAM)
            masks = sample_masks(
                n_global_images,
                (grid, grid),
                torch.Generator().manual_seed(mask_seed),
                cfg.objective.mask_probability,
                cfg.objective.mask_ratio_min_max,
            )
            mask_rows = masked_rows(masks).to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            values = {
                "lr": schedules.lr(step),
                "wd": schedules.weight_decay(step),
                "momentum": schedules.momentum(step),
                "teacher_temp": schedules.teacher_temp(step),
            }
            apply_schedules(optimizer, values["lr"], schedules.last_layer_lr(step), values["wd"])
            losses = train_step(model, optimizer, batch, masks, values, cfg.optim.clip_grad, autocast_dtype, mask_rows)
            telemetry.train_step(batch_size, time.perf_counter() - step_started, data_seconds)
            done = step + 1
            log_now = done % cfg.train.log_period == 0 or done == end_step
            save_now = done % cfg.train.checkpoint_period == 0 or done == end_step
            if log_now or save_now:  # never checkpoint diverged weights
                losses = _global_mean(losses, world)
                if not all(map(math.isfinite, losses.values())):
                    raise FloatingPointError(f"non-finite loss at step {done}: {losses}")
                skips.record(_gather_skipped(pending_skips, world))
                pending_skips = []
            if log_now:
                elapsed = time.perf_counter() - tick
                record = {
                    "step": done, **losses, **values, "images_per_s": (done - window_start) * global_batch / elapsed,
                    "skipped_images": skips.by_reason(), "skip_events": skips.events, "world_size": world.world_size,
                }
                metrics.write(record)
                telemetry.train_values(record)
                telemetry.skipped(record["skipped_images"])
                lineage.metrics({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=done)
                bar.update(task, status=f"loss {losses['loss']:.3f} {record['images_per_s']:.0f} img/s")
                tick, window_start = time.perf_counter(), done
            bar.update(task, completed=done)
            if save_now:
                trainer = {
                    "step": done,
                    "world_size": world.world_size,
                    "batch_size_per_gpu": batch_size,
                    "data": {"position": start_position + (done - start_step) * global_batch, "dataset": dataset_digest,
                             "skipped": skips.state_dict()},
                    "config": to_dict(cfg),
                }
                last_uri = checkpointer.save(done, model, optimizer, trainer)
                last_saved = done
        checkpointer.wait()
    return {"step": end_step, "start_step": start_step, "resumed_from": resumed_from, "last_checkpoint_step": last_saved,
            "last_checkpoint_uri": last_uri,
            "last_metrics": record, "skipped_images": skips.by_reason(), "world_size": world.world_size, "rank": world.rank}
