"""`visiond train`, `evaluate`, `predict` and `export`: parse options, call visiond.train / visiond.models."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from visiond.errors import UserError


def _logging() -> None:
    from visiond.logs import setup_logging

    setup_logging("info")


def comma_list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def given_on_command_line(ctx: typer.Context) -> set[str]:
    """The command's parameters the user typed (or set by environment), not left at their defaults."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}


def train(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="Dataset directory (manifest.csv) or a folder of class subfolders."),
    arch: str = typer.Option("smallcnn", help="smallcnn, vgg16/19, resnet18/34/50, mobilenet_v2/v3_small/v3_large, "
                                              "efficientnet_b0..b3, or the baseline knn."),
    out: Path = typer.Option(..., "--out", "-o", help="Best checkpoint; model.last.ckpt and model.train/ go beside it."),
    epochs: int = typer.Option(10, help="Epochs to train."),
    batch_size: int = typer.Option(32, help="Images per batch (per process under torchrun)."),
    image_size: int = typer.Option(None, help="Square input size in pixels (stored in the checkpoint); default: "
                                              "the --weights' (224; efficientnet_b1/b2/b3 240/288/300), the "
                                              "--init-from model's, else 64 (the images' own size when smaller)."),
    grayscale: bool = typer.Option(None, "--grayscale/--rgb", help="One grey channel or RGB (default: grey when "
                                                                   "the images are stored grey)."),
    weights: Path = typer.Option(None, help="Local torchvision ImageNet state dict (e.g. mobilenet_v2-b0353104.pth)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train only the new head at first."),
    unfreeze_after: int = typer.Option(0, help="With --freeze-backbone: unfreeze after this many epochs (0 = never)."),
    lr: float = typer.Option(None, help="Learning rate (of the head, from weights); default adamw 2e-3 from "
                                        "scratch, 1e-3 from weights; sgd ten times that."),
    weight_decay: float = typer.Option(None, help="Weight decay, never on biases and norm scales (default: "
                                                  "0.05 adamw, 5e-4 sgd)."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd."),
    scheduler: str = typer.Option("cosine", help="After the warm-up, per step: cosine, step or none."),
    warmup_epochs: float = typer.Option(1.0, help="Linear learning-rate warm-up (at most a fifth of the run)."),
    backbone_lr: float = typer.Option(0.1, help="From weights: the pretrained layers' lr as a fraction of --lr."),
    grad_clip: float = typer.Option(1.0, help="Clip the gradients' global norm to this (0 = off)."),
    ema: float = typer.Option(0.999, help="Decay of the weights' moving average, which is validated and saved "
                                          "(0 = off)."),
    batchnorm: str = typer.Option("auto", help="auto (frozen statistics from weights below 16 images a batch), "
                                               "train or freeze."),
    class_weights: str = typer.Option("none", help="none, loss (inverse-frequency weighted loss) or balanced (sampler)."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing for the loss (0..1)."),
    early_stop: int = typer.Option(0, help="Stop after this many epochs without a better val metric (0 = off)."),
    monitor: str = typer.Option("macro_f1", help="Validation metric for the best checkpoint: macro_f1 or accuracy."),
    augment: str = typer.Option(None, help="Augmentation preset: auto (default: none when the smallest class "
                                           "has 2,000+ training images, else safe), safe (no vertical flip, small "
                                           "turns and crops, light jitter, erasing), trivial, none, light, line "
                                           "(fixed camera over parts: flips both ways) or heavy."),
    resume: Path = typer.Option(None, help="Continue a run: its model.train/resume.safetensors, model.ckpt or dir."),
    init_from: Path = typer.Option(None, help="Fine-tune from a visiond checkpoint (new classes get new head rows)."),
    defect_classes: str = typer.Option(None, help="Comma-separated defect classes, stored in the checkpoint."),
    seed: int = typer.Option(0, help="Seed for initialisation, shuffling and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(-1, help="DataLoader workers (-1: 0 on CPU, up to 8 on CUDA)."),
    knn_k: int = typer.Option(5, help="--arch knn: neighbours that vote."),
    svm_kernel: str = typer.Option("rbf", help="--arch svm: rbf or linear."),
    svm_c: float = typer.Option(10.0, help="--arch svm: the SVM's C (smaller = more regularised)."),
    svm_max_train: int = typer.Option(10000, help="--arch svm: at most this many training images (a stratified "
                                                  "subset; an rbf fit grows ~quadratically with them)."),
    options: Path = typer.Option(None, "--options", help="YAML file of training options (e.g. the best.yaml "
                                                         "`visiond tune` writes); command-line options win."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Draw the per-epoch progress bar."),
    name: str = typer.Option(None, help="Model name carried by every prediction (default: the --init-from "
                                        "model's name, else the dataset folder's name; never the --out file's)."),
) -> None:
    """Train a classifier; the checkpoint carries classes, preprocessing and training metadata."""
    from visiond.data.augment import DEFAULT_PRESET
    from visiond.train.loop import TrainOptions, train as run_training

    _logging()
    opts = TrainOptions(
        data=dataset, out=out, arch=arch, epochs=epochs, batch_size=batch_size, image_size=image_size,
        grayscale=grayscale, weights=weights, freeze_backbone=freeze_backbone, unfreeze_after=unfreeze_after, lr=lr,
        weight_decay=weight_decay, optimizer=optimizer, scheduler=scheduler, label_smoothing=label_smoothing,
        warmup_epochs=warmup_epochs, backbone_lr=backbone_lr, grad_clip=grad_clip, ema=ema, batchnorm=batchnorm,
        class_weights=class_weights, early_stop=early_stop, monitor=monitor, augment=augment or DEFAULT_PRESET,
        resume=resume, init_from=init_from, seed=seed, device=device, workers=workers,
        defect_classes=comma_list(defect_classes), knn_k=knn_k, progress=progress, name=name, svm_kernel=svm_kernel,
        svm_c=svm_c, svm_max_train=svm_max_train)
    if options is not None:
        from visiond.train.options_file import apply_options_file

        opts = apply_options_file(opts, options, given_on_command_line(ctx))
    result = run_training(opts)
    if result.is_main and result.best_metrics:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items() if isinstance(v, float))
        typer.echo(f"{result.best}: best epoch {result.best_epoch} of {result.epochs} ({figures})")


def evaluate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to evaluate."),
    dataset: Path = typer.Argument(..., help="Dataset directory or class-folder tree."),
    split: str = typer.Option("test", help="train, val, test or all."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory (metrics.json, report.md, PNGs)."),
    defect_classes: str = typer.Option(None, help="Comma-separated defect classes (default: from the checkpoint)."),
    target_recall: float = typer.Option(0.99, help="Recall each defect threshold must reach."),
    write_threshold: bool = typer.Option(False, "--write-threshold", help="Store the thresholds in the checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation: none, flip or flip+crop (only the "
                                                  "flips and crops the training augmentation used)."),
) -> None:
    """Accuracy, per-class figures, confusion matrix, misclassified images, PR curves, calibration, report.md."""
    from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint

    _logging()
    report = evaluate_checkpoint(EvaluateOptions(
        checkpoint=checkpoint, dataset=dataset, split=split, out=out, defect_classes=comma_list(defect_classes),
        target_recall=target_recall, write_threshold=write_threshold, device=device, batch_size=batch_size,
        tta=tta))
    m = report.metrics
    typer.echo(f"{split}: {m['support']} images, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
               f"weighted-F1 {m['weighted_f1']:.4f} -> {out / 'report.md'}")
    cal = m["calibration"]
    typer.echo(f"  calibration: ECE {cal['ece_uncalibrated']:.4f} at T = 1, {cal['ece_calibrated']:.4f} at the "
               f"checkpoint's T = {cal['temperature']:.4g}" + (f" (tta {tta})" if tta != "none" else ""))
    for label, t in report.thresholds.items():
        if t["threshold"] is not None:
            typer.echo(f"  {label}: threshold {t['threshold']:.4g} gives recall {t['recall']:.3f} "
                       f"precision {t['precision']:.3f}")
    if report.new_version:
        typer.echo(f"thresholds written into {checkpoint} (version {report.new_version})")


def predict(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to run."),
    paths: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    top_k: int = typer.Option(3, help="How many classes to list per image."),
    json_lines: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation: none, flip or flip+crop."),
) -> None:
    """Classify images with the daemon's runtime: label, score and top-k per image."""
    from visiond.train.predict import predict_paths, print_table

    results = predict_paths(checkpoint, paths, top_k=top_k, device=device, batch_size=batch_size, tta=tta)
    if json_lines:
        for r in results:
            typer.echo(json.dumps(r))
    else:
        print_table(results)
    if not any(r.get("label") for r in results):
        raise UserError("no image could be read from " + " ".join(paths))


def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to export."),
    format: str = typer.Option(..., "--format", "-f", help="onnx, torchscript, triton (a Triton model repository) or "
                                                           "tflite (LiteRT; extra visiond[tflite])."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write; for triton, the model repository folder."),
    tolerance: float = typer.Option(1e-4, help="Largest allowed difference in probabilities vs PyTorch."),
    opset: int = typer.Option(18, help="ONNX opset."),
    name: str = typer.Option(None, "--name", help="triton: the model's name on the server (default: the "
                                                  "checkpoint's)."),
    max_batch: int = typer.Option(64, "--max-batch", help="triton: max_batch_size, the largest batch the server forms "
                                                          "from all boxes' requests."),
    batch: int = typer.Option(1, "--batch", help="tflite: the model's fixed batch size."),
    int8: bool = typer.Option(False, "--int8", help="tflite: int8 post-training quantisation (needs --calibration)."),
    calibration: Path = typer.Option(None, "--calibration", help="tflite --int8: dataset whose images calibrate "
                                                                 "the activation ranges."),
    calibration_split: str = typer.Option("val", "--calibration-split", help="tflite --int8: train, val, test or "
                                                                             "all."),
    calibration_images: int = typer.Option(200, "--calibration-images", help="tflite --int8: at most this many "
                                                                             "images, spread over the split."),
    int8_tolerance: float = typer.Option(None, "--int8-tolerance", help="tflite --int8: largest allowed "
                                                                        "probability difference (default 0.25)."),
) -> None:
    """Export to ONNX, TorchScript, a Triton model repository or TFLite: uint8 NHWC in, probabilities out, checked."""
    from visiond.models.export import export_checkpoint, export_triton

    if format == "tflite":
        _export_tflite(checkpoint, out, tolerance, batch, int8, calibration, calibration_split, calibration_images,
                       int8_tolerance)
        return
    if int8 or calibration is not None:
        raise UserError(f"--int8/--calibration: only for --format tflite, not {format!r}")
    if format == "triton":
        result = export_triton(checkpoint, out, name=name, max_batch=max_batch, tolerance=tolerance, opset=opset)
        typer.echo(f"{result.path}: Triton model {result.path.name} (config.pbtxt, labels.txt, 1/model.onnx), max abs "
                   f"difference vs PyTorch {result.max_abs_diff:.3g} (tolerance {tolerance:g}); serve it with "
                   f"`tritonserver --model-repository {out}`")
        return
    result = export_checkpoint(checkpoint, format, out, tolerance=tolerance, opset=opset)
    typer.echo(f"{result.path}: {format}, max abs difference vs PyTorch {result.max_abs_diff:.3g} "
               f"(tolerance {tolerance:g}) on batches {list(result.batch_sizes)}")


def _calibration_set(checkpoint: Path, dataset: Path, split: str, limit: int):
    """uint8 N x H x W x C images (as the daemon feeds the model) and their class indices, spread over the split."""
    import numpy as np

    from visiond.models.checkpoint import load_checkpoint
    from visiond.train.data import ImageDataset, load_splits
    from visiond.train.evaluate import SPLIT_CHOICES

    if split not in SPLIT_CHOICES:
        raise UserError(f"--calibration-split {split!r}: expected one of {', '.join(SPLIT_CHOICES)}")
    if limit < 1:
        raise UserError(f"--calibration-images {limit}: expected at least 1")
    ckpt = load_checkpoint(checkpoint)
    splits = load_splits(dataset, classes=list(ckpt.classes))
    samples = splits.train + splits.val + splits.test if split == "all" else getattr(splits, split)
    if len(samples) > limit:  # evenly spread, so every class of a sorted manifest is represented
        samples = [samples[round(i * (len(samples) - 1) / (limit - 1))] if limit > 1 else samples[0]
                   for i in range(limit)]
    ds = ImageDataset(splits.root, samples, list(ckpt.classes), ckpt.spec)
    if not len(ds):
        raise UserError(f"--calibration {dataset}: no readable images of the model's classes in split {split!r}")
    return np.stack([ds.image_hwc(i) for i in range(len(ds))]), ds.labels


def _export_tflite(checkpoint: Path, out: Path, tolerance: float, batch: int, int8: bool, calibration: Path | None,
                   split: str, limit: int, int8_tolerance: float | None) -> None:
    from visiond.models.export import export_checkpoint
    from visiond.models.tflite_export import INT8_TOLERANCE, require_extra

    if calibration is not None and not int8:
        raise UserError("--calibration: only with --int8 (a float export needs no calibration images)")
    if int8 and calibration is None:
        raise UserError("--int8 needs --calibration DATASET: the activation ranges come from real images")
    require_extra()
    images, labels = _calibration_set(checkpoint, calibration, split, limit) if int8 else (None, None)
    r = export_checkpoint(checkpoint, "tflite", out, tolerance=tolerance, batch=batch, int8=int8, calibration=images,
                          labels=labels, int8_tolerance=INT8_TOLERANCE if int8_tolerance is None else int8_tolerance,
                          progress=True)
    line = (f"{r.path}: tflite {r.quantization}, batch {batch}, {r.size_bytes / 1e6:.2f} MB, max abs difference vs "
            f"PyTorch {r.max_abs_diff:.3g} (tolerance {r.tolerance:g}) in the LiteRT interpreter")
    if r.top1_agreement is not None:
        line += f"; top-1 agreement {r.top1_agreement:.3f} on {r.calibration_images} {split} images"
    if r.accuracy_torch is not None:
        line += f", accuracy {r.accuracy_torch:.3f} -> {r.accuracy_tflite:.3f}"
    typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
    app.command("export")(export)
