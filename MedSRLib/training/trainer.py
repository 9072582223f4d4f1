"""The training loop: one config -> one trained, validated, exported model.

`train(config)` runs single-process or, under torchrun, DistributedDataParallel (see
`distributed.py`). Tasks, chosen from the registry kind and the config:

- "sr": pixel losses (`loss:` list) between the network's output and the HR patch.
- "gan": SRGAN / LFSR / hybrid generator step (content losses + adversarial) and a
  discriminator step; start it from an MSE pre-trained generator with `init_from`.
- "detector": lesion box regression (L2) on slices with a lesion mask.

LR inputs are made on the fly from HR patches by the config's `degradation:` list
(`degrade.apply_pipeline`; a step without "scale" gets the run's scale), seeded by
(seed, step, rank). Pre-upsampled networks get the bicubic-upsampled LR image
(`degrade.bicubic_upsample`, the call inference makes).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import importlib
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, list_data_collate
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import metrics as quality
from ..models import registry as zoo
from . import checkpoint as ckpt
from . import data as tdata
from ..transforms import degrade
from . import distributed
from .config import resolve_data_root
from .losses import AdversarialLoss, box_l2_loss, build_loss

NORMALISATION = ("MedSRLib.transforms.intensity.fit_mapping per volume: 0.5th/99.5th percentiles -> 0/1, "
                 "no clipping (same as inference)")


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def _import_object(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def load_matching_weights(module: nn.Module, path: str | Path,
                          rename: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Initialise `module` from a safetensors export or a training checkpoint, copying every
    tensor whose name and shape match (e.g. an x4 EDSR from its x2 weights: all but the
    upsampler). `rename` maps name prefixes of the file to the module's (e.g. an EDSR's
    "tail." to a multi-scale EDSR's "tails.x4."); renamed tensors replace the originals.
    A convolution kernel whose input channels are an odd multiple of the file's (a 2.5-D
    network's first layer, `context_slices`) gets the file's kernel on its middle channels and
    zeros on the neighbours' (`centre_embedded`), so it starts as the 2-D network.
    Returns (copied, total)."""
    matching = matching_tensors(module, path, rename)
    module.load_state_dict(matching, strict=False)
    return len(matching), len(module.state_dict())


def matching_tensors(module: nn.Module, path: str | Path,
                     rename: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """{module tensor name: tensor} that `load_matching_weights` copies from `path`; ValueError
    when none matches."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = ckpt.load_checkpoint(path)["model"]
    for old, new in (rename or {}).items():
        state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    own = module.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    matching.update({k: centre_embedded(v, own[k].shape[1]) for k, v in state.items()
                     if k in own and _is_context_expansion(v.shape, own[k].shape)})
    if not matching:
        raise ValueError(f"{path}: no tensor matches the network's names and shapes")
    return matching


def zero_unloaded(module: nn.Module, loaded: set[str], patterns: Sequence[str]) -> list[str]:
    """Sets to zero every tensor of `module` whose name matches one of the fnmatch `patterns`
    and is not in `loaded`; returns their names. A residual block whose last convolution is
    zero is the identity, so a network grown by new blocks (`init_zero:
    ["trunk.blocks.*.body.1.*"]`) starts as the network it grew from."""
    zeroed = []
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name not in loaded and any(fnmatch.fnmatch(name, p) for p in patterns):
                tensor.zero_()
                zeroed.append(name)
    return zeroed


def _is_context_expansion(file_shape: torch.Size, own_shape: torch.Size) -> bool:
    """True for conv kernels (out, in, kh, kw) differing only in input channels, the module's
    an odd multiple (> 1) of the file's."""
    if len(file_shape) < 3 or len(file_shape) != len(own_shape) or file_shape[1] == 0:
        return False
    same_rest = file_shape[0] == own_shape[0] and file_shape[2:] == own_shape[2:]
    ratio, remainder = divmod(own_shape[1], file_shape[1])
    return same_rest and remainder == 0 and ratio > 1 and ratio % 2 == 1


def centre_embedded(kernel: torch.Tensor, in_channels: int) -> torch.Tensor:
    """`kernel` (out, c, ...) widened to `in_channels` (an odd multiple of c) input channels:
    the original on the middle c channels, zeros elsewhere."""
    widened = kernel.new_zeros((kernel.shape[0], in_channels, *kernel.shape[2:]))
    start = (in_channels // kernel.shape[1]) // 2 * kernel.shape[1]
    widened[:, start:start + kernel.shape[1]] = kernel
    return widened


class Trainer:
    """State and loop of one run; `run()` trains to `train.steps` and exports."""

    def __init__(self, config: Mapping[str, Any], output_dir: Path, resume: bool = False,
                 progress: bool = True):
        self.config = copy.deepcopy(dict(config))
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.progress = progress
        self.context = distributed.setup(self.config["train"].get("device", "auto"))
        train_cfg = self.config["train"]
        if train_cfg.get("threads"):
            torch.set_num_threads(int(train_cfg["threads"]))
        self.seed = int(self.config.get("seed", 0))
        self.spec = zoo.get_spec(self.config["model"])
        self.task = self.config.get("task") or ("detector" if self.spec.kind == "detector" else
                                                "gan" if "gan" in self.config else "sr")
        self.scales = [int(s) for s in self.config.get("scales", [self.config.get("scale", 2)])]
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.cpu_seconds = 0.0
        self.best_score = -math.inf
        self.best_step = -1
        self.fixed_batch_loss_start: float | None = None
        self.last_validation: dict[str, Any] = {}
        self._build_model()
        self._build_data()
        self._build_optimisation()
        self._fixed_batch = None

    # ----- construction ------------------------------------------------------------------------

    def _build_model(self) -> None:
        torch.manual_seed(self.seed)
        overrides = dict(self.config.get("model_config", {}))
        self.model_config = {**self.spec.default_config, **overrides}
        self.context_slices = int(self.model_config.get("context_slices", 0))
        network = zoo.build_network(self.spec.name, scale=max(self.scales), **overrides)
        init_from = self.config.get("init_from")
        # one file, or a list of {path, rename: {file prefix: network prefix}} applied in order
        loaded: set[str] = set()
        for source in ([] if not init_from else init_from if isinstance(init_from, list) else [init_from]):
            path, rename = ((source["path"], source.get("rename")) if isinstance(source, Mapping)
                            else (source, None))
            matching = matching_tensors(network, path, rename)
            network.load_state_dict(matching, strict=False)
            loaded.update(matching)
            self._log_main(f"initialised {len(matching)}/{len(network.state_dict())} tensors from {path}")
        if self.config.get("init_zero"):
            zeroed = zero_unloaded(network, loaded, list(self.config["init_zero"]))
            if not zeroed:
                raise ValueError(f"init_zero {self.config['init_zero']} matches no tensor that "
                                 "init_from left unset")
            self._log_main(f"zeroed {len(zeroed)} tensors that init_from left unset")
        self.network = network.to(self.context.device)
        self.discriminator = None
        if self.task == "gan":
            gan = self.config["gan"]
            cls = _import_object(gan.get("discriminator", "MedSRLib.models.networks.srresnet:SRGANDiscriminator"))
            self.discriminator = cls(**gan.get("discriminator_config", {})).to(self.context.device)
        if self.context.enabled:
            unused = self.spec.kind == "multi_scale"
            self.network = DistributedDataParallel(self.network, find_unused_parameters=unused)
            if self.discriminator is not None:
                self.discriminator = DistributedDataParallel(self.discriminator)

    def _build_data(self) -> None:
        data_cfg = self.config["data"]
        root = resolve_data_root(data_cfg)
        self.data_root = root
        self.split = tdata.split_sources(data_cfg["sources"], root, data_cfg.get("modalities"))
        if not self.split.train:
            raise ValueError("the training set is empty (every patient is held out?)")
        with_mask = self.task == "detector"
        # LFSR (paper 003): SR patches and validation crops centred on the lesion masks.
        lesion_centred = with_mask or data_cfg.get("patch_centres", "foreground") == "lesion"
        if lesion_centred and not all(i.mask for i in self.split.train):
            raise ValueError("data.patch_centres: lesion needs a mask for every training volume (mask_replace)")
        self.volumes = tdata.volume_dataset([i.as_dict(root) for i in self.split.train], data_cfg,
                                            use_mask_foreground=lesion_centred)
        patches = int(data_cfg.get("patches_per_volume", 4))
        batch_size = int(self.config["train"].get("batch_size", 16))
        if batch_size % patches:
            raise ValueError(f"train.batch_size {batch_size} must be a multiple of "
                             f"data.patches_per_volume {patches}")
        self.visits_per_batch = batch_size // patches
        visits = int(data_cfg.get("visits_per_epoch", max(len(self.split.train), 1024)))
        visits = max(visits, self.visits_per_batch * self.context.world_size)
        transforms = tdata.random_transforms(data_cfg, with_mask, context_slices=self.context_slices)
        self.visit_dataset = tdata.SeededVisitDataset(self.volumes, transforms, visits, self.seed)
        self.sampler = tdata.ResumableDistributedSampler(self.visit_dataset, self.context.world_size,
                                                         self.context.rank, self.seed)
        workers = int(data_cfg.get("num_workers", 0))
        self.loader = DataLoader(self.visit_dataset, batch_size=self.visits_per_batch, sampler=self.sampler,
                                 num_workers=workers, collate_fn=list_data_collate, drop_last=True,
                                 persistent_workers=False, pin_memory=self.context.device.type == "cuda")
        self.validation = []
        if self.context.is_main and self.split.validation:
            val_volumes = tdata.volume_dataset([i.as_dict(root) for i in self.split.validation], data_cfg,
                                               use_mask_foreground=lesion_centred)
            multiple = int(np.lcm.reduce([s for s in self.scales]))
            self.validation = tdata.validation_slices(val_volumes, data_cfg, multiple, with_boxes=lesion_centred,
                                                      context_slices=self.context_slices)

    def _optimizer(self, parameters, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
        kind = cfg.get("type", "adam")
        lr = float(cfg.get("lr", 1e-4))
        if kind == "adam":
            return torch.optim.Adam(parameters, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                    weight_decay=float(cfg.get("weight_decay", 0.0)))
        if kind == "sgd":
            return torch.optim.SGD(parameters, lr=lr, momentum=float(cfg.get("momentum", 0.9)),
                                   weight_decay=float(cfg.get("weight_decay", 0.0)))
        raise ValueError(f"optimizer.type must be 'adam' or 'sgd', got {kind!r}")

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        cfg = self.config.get("scheduler") or {}
        milestones = sorted(int(m) for m in cfg.get("milestones", []))
        gamma = float(cfg.get("gamma", 0.5))
        warmup = int(cfg.get("warmup", 0))  # linear ramp over the first steps (Adam's first updates)

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            return ramp * gamma ** sum(step >= m for m in milestones)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _parameter_groups(self, cfg: Mapping[str, Any]) -> list[dict[str, Any]] | Any:
        """The network's parameters, or groups of them when `optimizer.lr_by_prefix` gives
        parameters whose names start with a prefix their own learning rate (e.g. a 2.5-D
        network's widened first layer, "head.", learning faster than the copied trunk).
        `optimizer.trainable` (name prefixes) freezes every other parameter (no gradient, not
        optimised)."""
        by_prefix = {str(k): float(v) for k, v in (cfg.get("lr_by_prefix") or {}).items()}
        trainable = [str(p) for p in cfg.get("trainable") or []]
        named = list(_unwrap(self.network).named_parameters())
        if trainable:
            if not any(name.startswith(p) for name, _ in named for p in trainable):
                raise ValueError(f"optimizer.trainable {trainable} match no parameter of {self.spec.name}")
            for name, parameter in named:
                parameter.requires_grad_(any(name.startswith(p) for p in trainable))
            named = [(name, parameter) for name, parameter in named if parameter.requires_grad]
        if not by_prefix:
            return [parameter for _, parameter in named]
        groups: dict[str, list] = {prefix: [] for prefix in [*by_prefix, ""]}
        for name, parameter in named:
            groups[next((p for p in by_prefix if name.startswith(p)), "")].append(parameter)
        unmatched = [prefix for prefix in by_prefix if not groups[prefix]]
        if unmatched:
            raise ValueError(f"optimizer.lr_by_prefix {unmatched} match no parameter of {self.spec.name}")
        return [{"params": params, **({"lr": by_prefix[prefix]} if prefix else {})}
                for prefix, params in groups.items() if params]

    def _build_optimisation(self) -> None:
        optimizer_cfg = self.config.get("optimizer", {})
        self.optimizer = self._optimizer(self._parameter_groups(optimizer_cfg), optimizer_cfg)
        self.scheduler = self._scheduler(self.optimizer)
        self.loss = build_loss(self.config.get("loss", [{"type": "l1"}])).to(self.context.device) \
            if self.task != "detector" else None
        if self.discriminator is not None:
            gan = self.config["gan"]
            self.d_optimizer = self._optimizer(self.discriminator.parameters(),
                                               {"lr": gan.get("lr", 1e-4), **gan.get("optimizer", {})})
            self.d_scheduler = self._scheduler(self.d_optimizer)
            self.adversarial = AdversarialLoss()
        precision = self.config["train"].get("precision", "fp32")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp16" and self.context.device.type != "cuda":
            raise ValueError("train.precision fp16 needs CUDA; use bf16 on CPU")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    # ----- helpers -----------------------------------------------------------------------------

    def _log_main(self, message: str) -> None:
        if self.context.is_main and self.progress:
            tqdm.write(message)

    def _autocast(self):
        return torch.autocast(self.context.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def scale_at(self, step: int) -> int:
        return self.scales[step % len(self.scales)]

    def make_input(self, hr: torch.Tensor, scale: int, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, HR target cropped to a multiple of the degradation's factors).

        For a 2.5-D network `hr` holds the slice and its neighbours as channels: every slice is
        degraded alike and the target is the middle one."""
        steps = degrade.with_scale(self.config.get("degradation", [{"type": "bicubic"}]), scale)
        factors = degrade.pipeline_factors(steps)
        hr = degrade.crop_to_multiple(hr, factors)
        lr = degrade.apply_pipeline(hr, steps, generator=generator)
        hr = self.middle_slice(hr)
        if self.spec.kind == "pre_upsampled":
            return degrade.bicubic_upsample(lr, hr.shape[-2:]), hr
        if factors[0] != factors[1]:
            raise ValueError(f"anisotropic degradation {factors} needs a pre-upsampled network, "
                             f"not {self.spec.name!r} ({self.spec.kind})")
        return lr, hr

    def middle_slice(self, stack: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W): the middle channel of a 2.5-D stack (N, k + 1, H, W); 2-D input as is."""
        if not self.context_slices:
            return stack
        middle = self.context_slices // 2
        return stack[:, middle:middle + 1]

    def forward(self, network: nn.Module, inputs: torch.Tensor, scale: int) -> torch.Tensor:
        if self.spec.kind == "multi_scale":
            return network(inputs, scale=scale)
        return network(inputs)

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(_seed_of(self.seed, "degrade", step, self.context.rank))

    def _sr_loss(self, network: nn.Module, hr: torch.Tensor, step: int
                 ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        scale = self.scale_at(step)
        inputs, target = self.make_input(hr, scale, self._generator(step))
        with self._autocast():
            output = self.forward(network, inputs.to(self.context.device), scale)
        target = target.to(self.context.device)
        if output.shape != target.shape:
            raise ValueError(f"{self.spec.name} output {tuple(output.shape)} != target {tuple(target.shape)}")
        total, parts = self.loss(output.float(), target)
        return total, parts, output, target

    def _detector_loss(self, network: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        """L2 box regression on patches holding a lesion (paper 003's LD) plus, when the network
        also returns lesion-presence logits, their binary cross-entropy."""
        images = batch["image"].float().to(self.context.device)
        boxes = batch["box"].float().to(self.context.device)
        present = (boxes[:, 2] > 0).float()  # (cx, cy, w, h); w = 0 marks "no lesion"
        with self._autocast():
            output = network(images)
        predicted, logits = output if isinstance(output, (tuple, list)) else (output, None)
        predicted = predicted.float().reshape(boxes.shape)
        weights = present[:, None].expand_as(boxes)
        box_loss = ((predicted - boxes) ** 2 * weights).sum() / (weights.sum() if weights.sum() > 0 else 1.0)
        parts = {"box_l2": float(box_loss.detach())}
        loss = box_loss
        if logits is not None:
            presence = F.binary_cross_entropy_with_logits(logits.float().reshape(-1), present)
            parts["presence_bce"] = float(presence.detach())
            loss = loss + float(self.config.get("presence_weight", 0.1)) * presence
        return loss, parts

    # ----- one optimisation step ---------------------------------------------------------------

    def _clip(self, parameters) -> None:
        clip = self.config.get("optimizer", {}).get("grad_clip")
        if not clip:
            return
        if clip.get("type", "norm") == "norm":
            torch.nn.utils.clip_grad_norm_(parameters, float(clip["max"]))
        else:  # VDSR's adjustable clipping: [-theta/lr, theta/lr]
            limit = float(clip["max"])
            if clip.get("adjustable"):
                limit = limit / self.optimizer.param_groups[0]["lr"]
            torch.nn.utils.clip_grad_value_(parameters, limit)

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        self.network.train()
        hr = batch["image"].float()
        self.optimizer.zero_grad(set_to_none=True)
        if self.task == "detector":
            loss, parts = self._detector_loss(self.network, batch)
        else:
            loss, parts, output, target = self._sr_loss(self.network, hr, self.step)
            if self.task == "gan":
                gan = self.config["gan"]
                critic = _unwrap(self.discriminator)
                critic.requires_grad_(False)
                with self._autocast():
                    adversarial = self.adversarial.generator_loss(critic(output).float())
                critic.requires_grad_(True)
                loss = loss + float(gan.get("adversarial_weight", 1e-3)) * adversarial
                parts["adversarial"] = float(adversarial.detach())
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        self._clip(self.network.parameters())
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.scheduler.step()
        if self.task == "gan":
            self.d_optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.discriminator(torch.cat([target, output.detach()])).float()
            d_loss = self.adversarial.discriminator_loss(logits[: len(target)], logits[len(target):])
            d_loss.backward()
            self.d_optimizer.step()
            self.d_scheduler.step()
            parts["discriminator"] = float(d_loss.detach())
        parts["loss"] = float(loss.detach())
        return parts

    # ----- fixed batch, validation -------------------------------------------------------------

    def fixed_batch_loss(self) -> float:
        """Content loss on the first training batch, averaged over the run's scales (model copy in
        train mode, no side effects; the degradation noise is the step-0 draw)."""
        probe = copy.deepcopy(_unwrap(self.network)).train()
        batch = self._fixed_batch
        with torch.no_grad():
            if self.task == "detector":
                return float(self._detector_loss(probe, batch)[0])
            losses = []
            for scale in self.scales:
                inputs, target = self.make_input(batch["image"].float(), scale, self._generator(0))
                output = self.forward(probe, inputs.to(self.context.device), scale).float()
                losses.append(float(self.loss(output, target.to(self.context.device))[0]))
        return float(np.mean(losses))

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        network = _unwrap(self.network).eval()
        results: dict[str, Any] = {}
        if self.task == "detector":
            l2, ious = [], []
            for item in self.validation:
                output = network(item.image.to(self.context.device))
                predicted = (output[0] if isinstance(output, (tuple, list)) else output).float().reshape(1, 4).cpu()
                l2.append(float(box_l2_loss(predicted, item.box)))
                ious.append(_box_iou(predicted[0], item.box[0]))
            results = {"box_l2": float(np.mean(l2)), "iou": float(np.mean(ious)), "slices": len(l2)}
            score = results["iou"]
        else:
            for scale in self.scales:
                model_scores, bicubic_scores = [], []
                for index, item in enumerate(self.validation):
                    generator = torch.Generator().manual_seed(_seed_of(self.seed, "validation", index))
                    inputs, target = self.make_input(item.image, scale, generator)
                    mask = item.foreground[..., :target.shape[-2], :target.shape[-1]]
                    output = self.forward(network, inputs.to(self.context.device), scale).float().cpu()
                    if self.spec.kind == "pre_upsampled":
                        bicubic = inputs
                    else:
                        bicubic = degrade.bicubic_upsample(self.middle_slice(inputs), target.shape[-2:])
                    model_scores.append(quality.all_metrics(output, target, 1.0, mask if mask.any() else None))
                    bicubic_scores.append(quality.all_metrics(bicubic, target, 1.0, mask if mask.any() else None))
                results[f"x{scale}"] = {"model": _mean_scores(model_scores), "bicubic": _mean_scores(bicubic_scores),
                                        "slices": len(model_scores)}
            score = float(np.mean([results[f"x{s}"]["model"]["psnr"] for s in self.scales]))
        network.train()
        self.last_validation = results
        if score > self.best_score:
            self.best_score, self.best_step = score, self.step
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save_checkpoint(self.output_dir / "checkpoints" / "best.pt",
                                 {"model": _unwrap(self.network).state_dict(), "step": self.step,
                                  "metrics_json": json.dumps(results)})
        return results

    # ----- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        state = {"model": _unwrap(self.network).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                 "batches_in_epoch": self.batches_in_epoch, "cpu_seconds": self.cpu_seconds,
                 "best_score": self.best_score, "best_step": self.best_step,
                 "fixed_batch_loss_start": self.fixed_batch_loss_start,
                 "config_json": json.dumps(self.config, sort_keys=True),
                 "grad_scaler": self.grad_scaler.state_dict()}
        if self.discriminator is not None:
            state.update({"discriminator": _unwrap(self.discriminator).state_dict(),
                          "d_optimizer": self.d_optimizer.state_dict(),
                          "d_scheduler": self.d_scheduler.state_dict()})
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        _unwrap(self.network).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.cpu_seconds = float(state["cpu_seconds"])
        self.best_score, self.best_step = float(state["best_score"]), int(state["best_step"])
        self.fixed_batch_loss_start = state.get("fixed_batch_loss_start")
        if state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        if self.discriminator is not None:
            _unwrap(self.discriminator).load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
            self.d_scheduler.load_state_dict(state["d_scheduler"])
        ckpt.set_rng_state(state["rng"])

    def save(self) -> None:
        if self.context.is_main:
            ckpt.save_checkpoint(self.output_dir / "checkpoints" / "last.pt", self.state())

    # ----- the loop ------------------------------------------------------------------------------

    def _next_batch(self, iterator):
        try:
            return next(iterator), iterator
        except StopIteration:
            self.epoch += 1
            self.batches_in_epoch = 0
            self.sampler.set_position(self.epoch, 0)
            iterator = iter(self.loader)
            return next(iterator), iterator

    def run(self) -> dict[str, Any]:
        train_cfg = self.config["train"]
        total_steps = int(train_cfg["steps"])
        last = self.output_dir / "checkpoints" / "last.pt"
        if self.resume and last.is_file():
            self.load_state(ckpt.load_checkpoint(last))
            self._log_main(f"resumed from {last} at step {self.step}")
        self.sampler.set_position(self.epoch, self.batches_in_epoch * self.visits_per_batch)
        iterator = iter(self.loader)
        log_every = int(train_cfg.get("log_every", 10))
        val_every = int(train_cfg.get("val_every", 500))
        checkpoint_every = int(train_cfg.get("checkpoint_every", 500))
        writer = _Logger(self.output_dir, self.context.is_main, self.config.get("name", "run"),
                         start_step=self.step)
        bar = tqdm(total=total_steps, initial=self.step, disable=not (self.context.is_main and self.progress),
                   desc=self.config.get("name", "train"), dynamic_ncols=True)
        data_seconds = compute_seconds = 0.0
        cpu_start = time.process_time()
        while self.step < total_steps:
            tick = time.perf_counter()
            batch, iterator = self._next_batch(iterator)
            self.batches_in_epoch += 1
            tock = time.perf_counter()
            if self._fixed_batch is None:
                self._fixed_batch = batch
                if self.fixed_batch_loss_start is None and self.context.is_main:
                    self.fixed_batch_loss_start = self.fixed_batch_loss()
            parts = self.train_step(batch)
            self.step += 1
            data_seconds += tock - tick
            compute_seconds += time.perf_counter() - tock
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4g}")
            record = {"step": self.step, "epoch": self.epoch, **parts,
                      "lr": self.optimizer.param_groups[0]["lr"]}
            self.history.append(record)
            if self.step % log_every == 0 or self.step == total_steps:
                record = {**record, "data_seconds": data_seconds, "compute_seconds": compute_seconds,
                          "it_per_s": log_every / max(data_seconds + compute_seconds, 1e-9)}
                data_seconds = compute_seconds = 0.0
                writer.write(record)
            if self.step % val_every == 0 or self.step == total_steps:
                if self.context.is_main and self.validation:
                    writer.write({"step": self.step, "validation": self.validate()})
                self.context.barrier()
            if self.step % checkpoint_every == 0 or self.step == total_steps:
                self.cpu_seconds += time.process_time() - cpu_start
                cpu_start = time.process_time()
                self.save()
        bar.close()
        summary = self._finish(writer)
        writer.close()
        return summary

    def _finish(self, writer: "_Logger") -> dict[str, Any]:
        spread = distributed.weight_spread(_unwrap(self.network), self.context)
        summary: dict[str, Any] = {"steps": self.step, "weight_spread": spread,
                                   "world_size": self.context.world_size, "history": self.history}
        if self.context.is_main:
            if self._fixed_batch is not None:
                summary["fixed_batch_loss"] = [self.fixed_batch_loss_start, self.fixed_batch_loss()]
            export = self.export(spread)
            summary["export"] = str(export)
            writer.write({"step": self.step, "final": {k: v for k, v in summary.items() if k != "history"}})
        self.context.barrier()  # every rank leaves together (rank 0 exports meanwhile)
        distributed.teardown(self.context)
        return summary

    def export(self, spread: float) -> Path:
        """safetensors + model card in the output folder (best validated weights by default)."""
        network = copy.deepcopy(_unwrap(self.network)).cpu()
        exported = "last"
        best = self.output_dir / "checkpoints" / "best.pt"
        if self.config.get("output", {}).get("export", "best") == "best" and best.is_file():
            network.load_state_dict(ckpt.load_checkpoint(best)["model"])
            exported = f"best (step {self.best_step})"
        train_items = self.split.train
        card = {
            "model": self.spec.name, "title": self.spec.title, "recipe": self.config.get("name"),
            "scales": (list(self.spec.scales) if self.spec.kind == "detector" else
                       list(self.scales) if self.spec.kind == "multi_scale" else [max(self.scales)]),
            "config": self.model_config,
            "modality": sorted({i.modality for i in train_items if i.modality}),
            "training_data": [i.path for i in train_items],
            "validation_data": [i.path for i in self.split.validation],
            "licence": sorted({i.licence for i in train_items if i.licence}),
            "steps": self.step, "exported_weights": exported,
            "metrics": self.last_validation if exported == "last" else self._best_metrics(best),
            "normalisation": NORMALISATION,
            "degradation": self.config.get("degradation"),
            "parameter_count": zoo.parameter_count(network),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "distributed": {"world_size": self.context.world_size, "weight_spread": spread},
            "training_config": self.config,
        }
        if self.spec.kind == "detector":  # slice score that keeps a box at inference (roi.py)
            card["score_threshold"] = float(self.config.get("score_threshold", 0.5))
        if self.spec.kind == "multi_scale":
            card["scales"] = list(self.spec.scales) if set(self.spec.scales) <= set(self.scales) else list(self.scales)
        stem = zoo.weights_stem(self.spec, max(self.scales))
        path = self.output_dir / f"{stem}.safetensors"
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            self.config.get("output", {}).get("export_dtype", "float32"))
        zoo.save_weights(network, path, card, dtype=dtype)
        return path

    def _best_metrics(self, best: Path) -> dict[str, Any]:
        return json.loads(ckpt.load_checkpoint(best).get("metrics_json", "{}"))


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two (cx, cy, w, h) boxes."""
    def corners(box: torch.Tensor) -> tuple[float, float, float, float]:
        cx, cy, w, h = (float(v) for v in box)
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(a), corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _mean_scores(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = set.intersection(*(set(s) for s in scores))
    result = {}
    for key in sorted(keys):
        values = [s[key] for s in scores]
        finite = [v for v in values if math.isfinite(v)]
        result[key] = float(np.mean(finite)) if finite else math.inf
    return result


class _Logger:
    """metrics.jsonl (and TensorBoard when installed), rank 0 only.

    The file holds one run's history: a run starting at step 0 replaces an old file in the same
    folder; a resumed run keeps the records up to its checkpoint's step and drops later ones.
    """

    def __init__(self, output_dir: Path, enabled: bool, name: str, start_step: int = 0):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self._keep_records_up_to(start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                pass

    def _keep_records_up_to(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        if step > 0:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line of an interrupted run
        self.path.write_text("".join(kept), encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record, default=float) + "\n")
        if self.tensorboard is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train(config: Mapping[str, Any], output_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train `config` (a loaded, defaulted config, see `config.load_config`) and export it."""
    out = Path(output_dir or config.get("output", {}).get("dir") or f"runs/{config.get('name', 'run')}")
    return Trainer(config, out, resume=resume, progress=progress).run()
