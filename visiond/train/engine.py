"""One training epoch and one evaluation pass, shared by the CNN loop and the knn baseline.

The model trains on uint8 images that went through the daemon's own resize; the
`TrainableModel` wrapper normalises them on the device with the runtime's Normalizer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from visiond.preprocess import Normalizer, PreprocessSpec
from visiond.train import transfer
from visiond.train.metrics import classification_metrics

__all__ = ["TrainableModel", "train_one_epoch", "evaluate"]


class TrainableModel(nn.Module):
    """uint8 N x C x H x W -> logits, normalising on the device exactly as the runtime does."""

    def __init__(self, net: nn.Module, spec: PreprocessSpec, channels_last: bool = False):
        super().__init__()
        self.net, self.normalize, self.channels_last = net, Normalizer(spec), channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(self.normalize(x, nhwc=False))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_one_epoch(model, loader, criterion, optimizer, device, scaler=None, amp_dtype=None, bar=None, *,
                    scheduler=None, grad_clip: float = 0.0, ema=None) -> torch.Tensor:
    """One pass over the training data; returns [loss sum, correct, count] for this rank, on the device
    (summed there so CUDA never waits for a number unless the progress bar shows it).

    After every optimizer step: the scheduler steps (warm-up and cosine are per step) and the
    moving average of the weights (`ema`) follows; gradients are clipped to `grad_clip` first."""
    model.train()
    net = _unwrap(model).net
    transfer.frozen_batchnorm_eval(net)
    scaling = scaler is not None and scaler.is_enabled()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaling:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(net)
        n = targets.new_tensor(targets.shape[0], dtype=torch.float64)
        sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == targets).sum().double(), n])
        if bar is not None and bar.enabled:
            total_loss, correct, count = sums.tolist()
            bar.advance(total_loss / count, correct / count)
    return sums


def evaluate(model: nn.Module, loader, device, classes: list[str], criterion=None, amp_dtype=None) -> dict:
    """Loss (when a criterion is given), accuracy, macro-F1 and the rest of `classification_metrics`."""
    model.eval()
    y_true, y_pred, loss_sum = [], [], 0.0
    with torch.inference_mode():
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                logits = model(images).float()
            if criterion is not None:
                loss_sum += criterion(logits, targets).item() * targets.shape[0]
            y_true.append(targets.cpu())
            y_pred.append(logits.argmax(1).cpu())
    if not y_true:
        return {}
    y_true, y_pred = torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()
    out = classification_metrics(y_true, y_pred, classes)
    if criterion is not None:
        out["loss"] = loss_sum / len(y_true)
    return out
