"""The pretraining loop: one obvious loop over steps, resumable from the last checkpoint."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial

import fsspec
import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dinoforge.checkpoint import join, latest_checkpoint, load_checkpoint, save_checkpoint
from dinoforge.config import Config, ModelConfig, to_dict
from dinoforge.data import open_source
from dinoforge.data.stream import MASK_STREAM, SkipLedger, multicrop_loader, sample_seed
from dinoforge.model.augment import MultiCropAugmentation
from dinoforge.model.masking import sample_masks
from dinoforge.model.optim import apply_schedules, param_groups
from dinoforge.model.schedules import CosineSchedule, sqrt_scaled_lr
from dinoforge.model.ssl import SSLMetaArch
from dinoforge.model.vit import DinoVisionTransformer, build_backbone

log = logging.getLogger("dinoforge.train")


def backbone_from_config(model: ModelConfig, global_crops_size: int, drop_path_rate: float = 0.0) -> DinoVisionTransformer:
    return build_backbone(
        model.arch,
        patch_size=model.patch_size,
        img_size=model.img_size or global_crops_size,
        num_register_tokens=model.num_register_tokens,
        ffn_layer=model.ffn_layer,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=model.drop_path_uniform,
        layerscale_init=model.layerscale_init,
        interpolate_offset=model.interpolate_offset,
        interpolate_antialias=model.interpolate_antialias,
        in_chans=model.in_chans,
    )


def build_meta_arch(cfg: Config) -> SSLMetaArch:
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
            momentum=CosineSchedule(t.momentum_teacher, t.final_momentum_teacher, total),
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


def train_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, batch: dict, masks: torch.Tensor, values: dict, clip_grad: float) -> dict[str, torch.Tensor]:
    """Forward, backward with gradient clipping per student module, AdamW, EMA teacher.
    Returns the detached losses (tensors: reading them would synchronise a GPU)."""
    loss, parts = model(batch["global_crops"], batch.get("local_crops"), masks, values["teacher_temp"])
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


def pretrain(cfg: Config, output: str, max_steps: int | None = None, progress: bool = True) -> dict:
    """Trains until ``cfg.total_steps`` (or ``max_steps`` in this invocation's total),
    resuming from the newest checkpoint under ``output``. Returns a summary."""
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = cfg.train.batch_size_per_gpu
    model = build_meta_arch(cfg).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        param_groups(model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
    )
    schedules = Schedules.from_config(cfg, batch_size)

    source = open_source(cfg.data.dataset, cfg.data)
    dataset_digest = source.manifest.digest if hasattr(source, "manifest") else cfg.data.dataset
    start_step, start_position, skips = 0, 0, SkipLedger()
    resumed_from = latest_checkpoint(output)
    if resumed_from:
        state = load_checkpoint(resumed_from)
        changed = _changed_keys(state["config"], to_dict(cfg))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state:  # stochastic depth draws on the model's device
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start_step, start_position = state["step"], state["data"]["position"]
        skips.load_state_dict(state["data"]["skipped"])
        if state["data"]["dataset"] != dataset_digest:
            log.warning("resuming on a different dataset (%s, checkpoint: %s): the sample stream will not continue exactly",
                        dataset_digest, state["data"]["dataset"])
        log.info("resumed from %s at step %d", resumed_from, start_step)

    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join(root, "config.yaml"), "w") as handle:
        yaml.safe_dump(to_dict(cfg), handle, sort_keys=False)

    end_step = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    loader = multicrop_loader(
        source, MultiCropAugmentation(cfg.crops), batch_size, cfg.train.seed, start_position, cfg.data.num_workers
    )
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    n_global_images = 2 * batch_size
    last_saved, record = start_step, {}
    columns = [TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar, fs.open(join(root, "metrics.jsonl"), "a") as metrics:
        task = bar.add_task("steps", total=end_step, completed=start_step, status="")
        batches = iter(loader)
        tick, window_start = time.perf_counter(), start_step
        for step in range(start_step, end_step):
            batch = next(batches)
            skips.record(batch.pop("skipped"))
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            masks = sample_masks(
                n_global_images,
                (grid, grid),
                torch.Generator().manual_seed(sample_seed(cfg.train.seed, step, MASK_STREAM)),
                cfg.objective.mask_probability,
                cfg.objective.mask_ratio_min_max,
            ).to(device)
            values = {
                "lr": schedules.lr(step),
                "wd": schedules.weight_decay(step),
                "momentum": schedules.momentum(step),
                "teacher_temp": schedules.teacher_temp(step),
            }
            apply_schedules(optimizer, values["lr"], schedules.last_layer_lr(step), values["wd"])
            losses = train_step(model, optimizer, batch, masks, values, cfg.optim.clip_grad)
            done = step + 1
            log_now = done % cfg.train.log_period == 0 or done == end_step
            save_now = done % cfg.train.checkpoint_period == 0 or done == end_step
            if log_now or save_now:  # never checkpoint diverged weights
                losses = {k: v.item() for k, v in losses.items()}
                if not all(map(math.isfinite, losses.values())):
                    raise FloatingPointError(f"non-finite loss at step {done}: {losses}")
            if log_now:
                elapsed = time.perf_counter() - tick
                record = {
                    "step": done, **losses, **values, "images_per_s": (done - window_start) * batch_size / elapsed,
                    "skipped_images": skips.by_reason(), "skip_events": skips.events,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(task, status=f"loss {losses['loss']:.3f} {record['images_per_s']:.0f} img/s")
                tick, window_start = time.perf_counter(), done
            bar.update(task, completed=done)
            if save_now:
                state = {
                    "step": done,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {}),
                    "config": to_dict(cfg),
                    "data": {"position": start_position + (done - start_step) * batch_size, "dataset": dataset_digest, "skipped": skips.state_dict()},
                }
                save_checkpoint(state, output, done, cfg.train.keep_checkpoints)
                last_saved = done
    return {"step": end_step, "start_step": start_step, "resumed_from": resumed_from, "last_checkpoint_step": last_saved, "last_metrics": record,
            "skipped_images": skips.by_reason()}
