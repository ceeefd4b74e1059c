"""The pretraining loop, driven by Accelerate: one process with `python -m pretrain`, many with `accelerate launch`.

Per optimizer step on every process: `grad_accum` batches from the shard stream -> kornia augmentation
(image and mask alike) -> labels from the augmented masks -> CutMix/Mixup (masks included) -> normalisation
-> BCE on the multi-label logits (+ cross-entropy of the dense head) -> AdamW, clipping, cosine schedule.

Resume is exact: the data stream of epoch `e` (one `checkpoint_every` interval) is seeded by `(seed, e)`,
a resumed run skips the batches its checkpoint already consumed in that epoch, and `load_state` restores
model, optimizer, schedule, step and every process's RNG.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from PIL import Image
from timm.data import resolve_data_config
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from synth.config import ConfigError, save_config, to_dict
from synth.reader import make_dataset

from .augment import augment_batch, build_augment
from .config import PretrainConfig
from .cutmix import mix_batch
from .data import collate, train_loader, val_loader  # noqa: F401  (collate re-exported for tests)
from .metrics import multilabel_ap
from .models import PretrainNet, create_backbone, model_config, save_model
from .tracking import MetricsLog, class_palette, mask_grid, wandb_init_kwargs

log = logging.getLogger("pretrain")
CKPT_RE = re.compile(r"^step-(\d+)$")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the bad state."""


class TrainState:
    """The loop's own counters, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.wandb_id = ""

    def state_dict(self) -> dict:
        return {"step": self.step, "wandb_id": self.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.wandb_id = int(state["step"]), str(state["wandb_id"])


def resolve_mixed_precision(value: str) -> str:
    """`auto`: fp32 on a CPU (bf16 autocast is emulated and slow there), bf16 or fp16 on a GPU."""
    if value != "auto":
        return value
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def lr_factor(cfg: PretrainConfig):
    """Linear warmup to 1, then cosine to min_lr / lr at max_steps; argument = optimizer steps taken."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(net: PretrainNet, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and position/class tokens; optional layer-wise lr decay."""
    backbone = net.backbone
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(backbone, weight_decay=cfg.weight_decay, no_weight_decay_list=skip,
                                          layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(backbone, weight_decay=cfg.weight_decay, no_weight_decay_list=skip)
    if net.dense is not None:
        groups += param_groups_weight_decay(net.dense, weight_decay=cfg.weight_decay)
    out = []
    for group in groups:
        if group["params"]:
            out.append({"params": group["params"], "weight_decay": group["weight_decay"],
                        "lr": cfg.lr * group.get("lr_scale", 1.0)})
    return out


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `.tmp` folder is an interrupted save and never counts)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def resolve_resume(cfg: PretrainConfig, run_dir: Path) -> Path | None:
    existing = checkpoints(run_dir)
    if cfg.resume is None:
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints ({existing[-1].name}): pass resume=latest to "
                              "continue it, or choose a new --out")
        return None
    if cfg.resume == "latest":
        if not existing:
            log.info("resume=latest: no checkpoint in %s yet, starting from step 0", run_dir)
        return existing[-1] if existing else None
    path = Path(cfg.resume)
    if not (path / "model.safetensors").is_file() and not any(path.glob("pytorch_model*")):
        raise ConfigError(f"key 'resume': {path} is not a checkpoint folder (expected RUN/checkpoints/step-N)")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """`save_state` into step-N.tmp, renamed to step-N once every process has written its part."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def validate(accelerator: Accelerator, model: torch.nn.Module, loader, normalize, classes: list[str]) -> dict:
    """mAP and per-class AP over the whole validation split, gathered from every process."""
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for batch in loader:
        with accelerator.autocast():
            out = model(normalize(batch["image"].to(accelerator.device)))
        scores.append(torch.sigmoid(out["logits"].float()).cpu().numpy())
        targets.append(batch["labels"].numpy())
    model.train(was_training)
    k = len(classes) - 1
    local = (np.concatenate(scores) if scores else np.zeros((0, k)), np.concatenate(targets) if targets else
             np.zeros((0, k)))
    parts = gather_object([local])
    all_scores = np.concatenate([p[0] for p in parts])
    all_targets = np.concatenate([p[1] for p in parts])
    result = multilabel_ap(all_scores, all_targets, classes[1:])
    result["samples"] = int(all_scores.shape[0])
    return result


def build_model(cfg: PretrainConfig, classes: list[str]) -> tuple[PretrainNet, dict]:
    backbone = create_backbone(cfg.model, num_classes=len(classes) - 1, img_size=cfg.img_size,
                               global_pool=cfg.global_pool, weights=cfg.weights, drop_path_rate=cfg.drop_path_rate,
                               skip_head=True, **cfg.model_kwargs)
    data_cfg = resolve_data_config({}, model=backbone)
    mcfg = model_config(cfg.model, num_classes=len(classes) - 1, classes=classes, img_size=cfg.img_size,
                        global_pool=cfg.global_pool, kwargs=dict(cfg.model_kwargs), mean=data_cfg["mean"],
                        std=data_cfg["std"])
    return PretrainNet(backbone, len(classes) - 1, dense_head=cfg.dense_head), mcfg


def train(cfg: PretrainConfig, shards: str, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) pretraining; returns a summary {step, val, checkpoint, model}."""
    run_dir = Path(run_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_mixed_precision(
        cfg.mixed_precision), gradient_accumulation_steps=cfg.grad_accum, log_with="wandb" if cfg.wandb else None,
        project_dir=str(run_dir))
    resume_from = resolve_resume(cfg, run_dir)
    classes = make_dataset(shards, cfg.train_split).classes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    set_seed(cfg.seed)  # identical initial weights on every process
    net, mcfg = build_model(cfg, classes)
    mean = torch.tensor(mcfg["mean"], device=accelerator.device).view(1, -1, 1, 1)
    std = torch.tensor(mcfg["std"], device=accelerator.device).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    optimizer = torch.optim.AdamW(param_groups(net, cfg), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    if cfg.compile:
        net = torch.compile(net)
    model, optimizer = accelerator.prepare(net, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    ema = None
    if cfg.ema:
        ema = ModelEmaV3(accelerator.unwrap_model(model, keep_torch_compile=False), decay=cfg.ema_decay)
        accelerator.register_for_checkpointing(ema)
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(f"cannot resume from {resume_from}: it does not match this config ({err})") from err
        log.info("resumed from %s at step %d", resume_from, state.step)
    else:
        set_seed(cfg.seed + accelerator.process_index)  # augmentation and mixing differ per process
    if accelerator.is_main_process and not state.wandb_id:
        state.wandb_id = secrets.token_hex(4)  # kept in the checkpoint, so a resumed run continues the W&B run
    if cfg.wandb:
        accelerator.init_trackers(cfg.wandb_project, config=to_dict(cfg), init_kwargs={"wandb": wandb_init_kwargs(
            run_dir, name=cfg.name, group=cfg.study, run_id=state.wandb_id, job_type="pretrain")})
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step if resume_from else None) \
        if accelerator.is_main_process else None

    def weights_to_keep() -> PretrainNet:  # what is validated and saved: the EMA when there is one
        return ema.module if ema is not None else accelerator.unwrap_model(model, keep_torch_compile=False)

    def record(values: dict, step: int) -> None:
        if metrics is not None:
            metrics.write({"step": step, **values})
        accelerator.log({k: v for k, v in values.items() if isinstance(v, int | float)}, step=step)

    aug = build_augment(cfg.augment, (cfg.img_size, cfg.img_size))
    mix = cfg.mix
    val = val_loader(shards, cfg.val_split, img_size=cfg.img_size, batch_size=cfg.batch_size,
                     num_workers=min(cfg.num_workers, 1), classes=classes) if cfg.val_split else None
    end = cfg.stop_after or cfg.max_steps
    world = accelerator.num_processes
    step, last_val = state.step, None
    trace = None
    if cfg.trace_samples:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        trace = (run_dir / "samples" / f"rank-{accelerator.process_index}.txt").open("a")
    bar = tqdm(total=end, initial=step, desc="pretrain", disable=not (progress and accelerator.is_local_main_process))
    window = {"loss": 0.0, "bce": 0.0, "dense": 0.0, "n": 0, "time": 0.0, "steps": 0}
    try:
        while step < end:
            epoch = step // cfg.checkpoint_every
            epoch_end = min((epoch + 1) * cfg.checkpoint_every, cfg.max_steps)
            epoch_steps = epoch_end - epoch * cfg.checkpoint_every
            loader = train_loader(shards, cfg.train_split, img_size=cfg.img_size, batch_size=cfg.batch_size,
                                  batches=epoch_steps * cfg.grad_accum, world_size=world,
                                  num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                                  epoch=epoch, classes=classes)
            batches = iter(loader)
            for _ in range((step - epoch * cfg.checkpoint_every) * cfg.grad_accum):  # consumed before the resume
                next(batches)
            while step < min(epoch_end, end):
                started = time.perf_counter()
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    if trace is not None:
                        trace.write(f"{step + 1} " + " ".join(batch["key"]) + "\n")
                    with accelerator.accumulate(model):
                        losses = train_micro_step(accelerator, model, optimizer, batch, aug, mix, normalize, cfg,
                                                  grid_path=run_dir / "cutmix_grid.png" if step == micro == 0 else None,
                                                  classes=classes)
                    if not math.isfinite(losses["loss"]):
                        raise NonFiniteLoss(f"loss is {losses['loss']} at step {step + 1} (bce {losses['bce']}, "
                                            f"dense {losses['dense']}); stopped without saving, last good "
                                            f"checkpoint: {_last(run_dir)}")
                    for key in ("loss", "bce", "dense"):
                        window[key] += losses[key]
                    window["n"] += 1
                scheduler.step()
                step += 1
                if ema is not None:  # step = optimizer steps done, as timm counts them (no decay on the first)
                    ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=step)
                state.step = step
                window["steps"] += 1
                window["time"] += time.perf_counter() - started
                bar.update(1)
                if step % cfg.log_every == 0 or step == end:
                    record({"loss": window["loss"] / window["n"], "bce": window["bce"] / window["n"],
                            "dense_loss": window["dense"] / window["n"],
                            "lr": max(g["lr"] for g in optimizer.param_groups),
                            "images_per_s": window["steps"] * cfg.batch_size * cfg.grad_accum * world / window["time"],
                            "epoch": epoch}, step)
                    bar.set_postfix(loss=f"{window['loss'] / window['n']:.4f}")
                    window = {"loss": 0.0, "bce": 0.0, "dense": 0.0, "n": 0, "time": 0.0, "steps": 0}
                if val is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
                    last_val = validate(accelerator, weights_to_keep(), val, normalize, classes)
                    record({"val_mAP": last_val["mAP"], "val_samples": last_val["samples"],
                            **{f"val_AP/{k}": v for k, v in last_val["ap"].items() if v is not None}}, step)
                if step % cfg.checkpoint_every == 0 or step == end:
                    save_checkpoint(accelerator, run_dir, step, cfg.keep_checkpoints)
        bar.close()
        if step == cfg.max_steps and accelerator.is_main_process:
            save_model(weights_to_keep().backbone, run_dir, mcfg)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        if trace is not None:
            trace.close()
        accelerator.end_training()  # also ends the process group: no collective after this
    return {"step": step, "val": last_val, "checkpoint": str(_last(run_dir)),
            "model": str(run_dir / "model.safetensors") if step == cfg.max_steps else None}


def _last(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def train_micro_step(accelerator: Accelerator, model, optimizer, batch: dict, aug, mix, normalize,
                     cfg: PretrainConfig, *, grid_path: Path | None, classes: list[str]) -> dict:
    """One batch: augment, mix, forward, backward; the optimizer steps when Accelerate syncs gradients."""
    images = batch["image"].to(accelerator.device, non_blocking=True)
    masks = batch["mask"].to(accelerator.device, non_blocking=True)
    images, masks = augment_batch(aug, images, masks)
    k = len(classes) - 1
    present = images.new_zeros(masks.shape[0], k + 1).scatter_(1, masks.flatten(1), 1.0)
    labels = present[:, 1:]  # presence after the crop: a defect cropped away is absent
    images, labels, dense_target, info = mix_batch(images, labels, masks, mix)
    if grid_path is not None and accelerator.is_main_process:
        log_grid(accelerator, images, dense_target, classes, grid_path, info["mode"])
    out = model(normalize(images))
    bce = F.binary_cross_entropy_with_logits(out["logits"].float(), labels)
    dense = F.cross_entropy(out["dense"].float(), dense_target) if "dense" in out else bce.new_zeros(())
    loss = bce + cfg.dense_weight * dense
    accelerator.backward(loss)
    if accelerator.sync_gradients and cfg.clip_grad is not None:
        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    values = accelerator.reduce(torch.stack([loss.detach(), bce.detach(), dense.detach()]), reduction="mean")
    if torch.isfinite(values).all():  # never step on a non-finite loss: the caller stops the run
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss_v, bce_v, dense_v = (float(v) for v in values.cpu())
    return {"loss": loss_v, "bce": bce_v, "dense": dense_v}


def log_grid(accelerator: Accelerator, images, masks, classes: list[str], path: Path, mode: str) -> None:
    """The first mixed batch and its masks, as RUN/cutmix_grid.png and a W&B image."""
    grid = mask_grid(images, masks, class_palette(classes))
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)
    if accelerator.trackers:
        import wandb

        caption = f"{mode}: images (top) and mixed masks (bottom); " + ", ".join(
            f"{i}={c}" for i, c in enumerate(classes))
        accelerator.get_tracker("wandb", unwrap=True).log({"cutmix_batch": wandb.Image(grid, caption=caption)},
                                                           step=0)
