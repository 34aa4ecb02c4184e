"""The training loop: one obvious loop over steps that hands the work off, resumable from the
last checkpoint (``pretrain``). The parts it calls live in ``dinoforge.training``."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import fsspec
import torch
import yaml

from dinoforge.checkpoint import (
    Checkpointer,
    checkpoint_digest,
    latest_checkpoint,
    load_model_weights,
    resolve_checkpoint,
)
from dinoforge.config import Config, to_dict
from dinoforge.data import open_source, source_digest
from dinoforge.data.augment import MultiCropAugmentation
from dinoforge.data.masking import MaskSampler
from dinoforge.data.storage import join
from dinoforge.data.stream import RANK_STREAM, multicrop_loader, sample_seed
from dinoforge.distributed import PRECISIONS, World, close_world, gather_lists, global_mean, init_world, shard_model
from dinoforge.model import MetaArch
from dinoforge.model.objective import masked_rows
from dinoforge.telemetry import Telemetry
from dinoforge.training.build import build_meta_arch
from dinoforge.training.ema import update_ema
from dinoforge.training.metrics import TrainMetrics
from dinoforge.training.optim import build_optimizer
from dinoforge.training.schedules import Schedules
from dinoforge.training.state import TrainState

if TYPE_CHECKING:
    from dinoforge.lineage import Lineage

log = logging.getLogger("dinoforge.train")


def pretrain(cfg: Config, output: str, max_steps: int | None = None, progress: bool = True) -> dict:
    """Trains until ``cfg.total_steps`` (or ``max_steps`` in this invocation's total),
    resuming from the newest committed checkpoint under ``output``; under torchrun every rank
    runs this. Returns a summary."""
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    world = init_world()
    try:
        return _pretrain(cfg, output, max_steps, progress and world.is_main, world)
    finally:
        if owns_group:
            close_world()


def _pretrain(cfg: Config, output: str, max_steps: int | None, progress: bool, world: World) -> dict:
    telemetry = Telemetry(cfg.stage, rank=world.rank)
    # Imported here: MLflow takes ~2 s to import and building or timing a step (dinoforge bench,
    # also where MLflow is not installed) does not need it.
    from dinoforge.lineage import stage_lineage

    lineage = stage_lineage(cfg.stage, output, enabled=world.is_main)
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


def _train(
    cfg: Config,
    output: str,
    max_steps: int | None,
    progress: bool,
    world: World,
    telemetry: Telemetry,
    lineage: Lineage,
) -> dict:
    seed, batch_size = cfg.train.seed, cfg.train.batch_size_per_gpu
    global_batch = batch_size * world.world_size
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = build_meta_arch(cfg).to(world.device)
    model.train()
    if world.world_size > 1:
        shard_model(model, world, cfg.train.precision)
    optimizer = build_optimizer(model, cfg)
    schedules = Schedules.from_config(cfg, global_batch)
    metrics = TrainMetrics(output, world, telemetry, lineage, progress, global_batch)
    checkpointer = Checkpointer(
        output, world, cfg.train.keep_checkpoints, cfg.train.async_checkpoint, metrics.checkpoint
    )

    source = open_source(cfg.data.dataset, cfg.data)
    state = TrainState.start(cfg, world.world_size, source_digest(source, cfg.data.dataset))
    _record_inputs(lineage, cfg, state.dataset)
    # Stochastic depth differs per rank; a resume at the same world size restores these streams.
    torch.manual_seed(sample_seed(seed, world.rank, RANK_STREAM))
    resumed_from = _resume(output, cfg, model, optimizer, checkpointer, state, world, lineage)
    if world.is_main:
        _write_config(output, cfg)
    augmentation = MultiCropAugmentation(cfg.crops)
    loader = multicrop_loader(
        source, augmentation, batch_size, seed, state.position, cfg.data.num_workers, world.rank, world.world_size
    )
    grid, objective = cfg.crops.global_crops_size // cfg.model.patch_size, cfg.objective
    masker = MaskSampler(
        seed, world.rank, 2 * batch_size, grid, objective.mask_probability, objective.mask_ratio_min_max
    )
    # FSDP casts the sharded parameters itself; a single process uses autocast instead.
    autocast_dtype = PRECISIONS[cfg.train.precision] if world.world_size == 1 else None
    end_step = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    start_step, last_saved, record, skipped = state.step, (state.step, resumed_from), {}, []

    with metrics.progress(start_step, end_step):
        batches = iter(loader)
        for step in range(start_step, end_step):
            started = time.perf_counter()
            batch = next(batches)
            data_seconds = time.perf_counter() - started
            skipped += batch.pop("skipped")
            values = schedules.apply(optimizer, step)
            batch = _on_device(batch, masker(step), world.device)
            losses = train_step(model, optimizer, batch, values, cfg.optim.clip_grad, autocast_dtype)
            state.advance(global_batch)
            metrics.step(state.step, batch_size, time.perf_counter() - started, data_seconds)
            log_now = state.step % cfg.train.log_period == 0 or state.step == end_step
            save_now = state.step % cfg.train.checkpoint_period == 0 or state.step == end_step
            if log_now or save_now:  # never checkpoint diverged weights
                losses = _finite_mean(losses, world, state.step)
                state.skipped.record(gather_lists(skipped, world))
                skipped = []
            if log_now:
                record = metrics.log(state, losses, values)
            if save_now:
                last_saved = (state.step, checkpointer.save(model, optimizer, state))
        checkpointer.wait()
    return {
        "step": end_step,
        "start_step": start_step,
        "resumed_from": resumed_from,
        "last_checkpoint_step": last_saved[0],
        "last_checkpoint_uri": last_saved[1],
        "last_metrics": record,
        "skipped_images": state.skipped.by_reason(),
        "world_size": world.world_size,
        "rank": world.rank,
    }


def train_step(
    model: MetaArch,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    values: dict[str, float],
    clip_grad: float,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Forward (under autocast when ``autocast_dtype`` is set), backward with gradient clipping
    per student module, AdamW, the EMA (the teacher, or distillation's spare EMA). ``batch``:
    ``global_crops``, ``local_crops`` (when there are local crops), ``masks`` and, best found on
    the host, ``mask_rows`` (see ``SSLMetaArch.forward``). Returns the detached losses (tensors:
    reading them would synchronise a GPU)."""
    device_type = batch["global_crops"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss, parts = model(
            batch["global_crops"],
            batch.get("local_crops"),
            batch["masks"],
            values["teacher_temp"],
            batch.get("mask_rows"),
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        for module in model.student_modules():
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
    optimizer.step()
    update_ema(model, values["momentum"])
    return {"loss": loss.detach(), **parts}


def _on_device(batch: dict[str, torch.Tensor], masks: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The step's crops and masks on ``device``, with the masked rows found on the host (on a
    GPU, finding them there would make the host wait for the device)."""
    tensors = {**batch, "masks": masks, "mask_rows": masked_rows(masks)}
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def _resume(
    output: str,
    cfg: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpointer: Checkpointer,
    state: TrainState,
    world: World,
    lineage: Lineage,
) -> str | None:
    """Continues the newest committed checkpoint under ``output`` (model, optimizer, this
    rank's RNG, ``state``); without one, starts from ``train.init_from``'s weights when set.
    Returns the checkpoint resumed from."""
    uri = latest_checkpoint(output)
    if uri is None:
        if cfg.train.init_from:
            source_uri = resolve_checkpoint(cfg.train.init_from)
            load_model_weights(source_uri, model)
            log.info("initialised the weights from %s", source_uri)
        return None
    saved = checkpointer.load(uri, model, optimizer)
    for change in state.continue_from(saved):
        log.warning("%s", change)
    if saved.world_size != world.world_size:  # the saved RNG streams were per rank: start new ones
        torch.manual_seed(sample_seed(cfg.train.seed + saved.step, world.rank, RANK_STREAM))
    log.info("resumed from %s at step %d", uri, state.step)
    lineage.input(uri, checkpoint_digest(uri), name="resumed_from", kind="checkpoint")
    return uri


def _finite_mean(losses: dict[str, torch.Tensor], world: World, step: int) -> dict[str, float]:
    mean = global_mean(losses, world)
    if not all(map(math.isfinite, mean.values())):
        raise FloatingPointError(f"non-finite loss at step {step}: {mean}")
    return mean


def _record_inputs(lineage: Lineage, cfg: Config, dataset_digest: str) -> None:
    from dinoforge.lineage import digest_uri

    lineage.params(to_dict(cfg))
    kind, _, uri = cfg.data.dataset.partition(":")
    manifest = kind == "manifest"
    lineage.input(
        uri if manifest else cfg.data.dataset,
        dataset_digest,
        name="train_data",
        kind="manifest" if manifest else "dataset",
    )
    if cfg.stage == "distill":
        lineage.input(cfg.distill.teacher, digest_uri(cfg.distill.teacher), name="teacher", kind="weights")
    if cfg.train.init_from:
        init = resolve_checkpoint(cfg.train.init_from)
        lineage.input(init, checkpoint_digest(init), name="init_from", kind="checkpoint")


def _write_config(output: str, cfg: Config) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(join(root, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
