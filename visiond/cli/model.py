"""`visiond train`, `evaluate`, `predict` and `export`: parse options, call visiond.train / visiond.models."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from visiond.errors import UserError


def _logging() -> None:
    from visiond.logs import setup_logging

    setup_logging("info")


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def train(
    dataset: Path = typer.Argument(..., help="Dataset directory (manifest.csv) or a folder of class subfolders."),
    arch: str = typer.Option("smallcnn", help="smallcnn, vgg16/19, resnet18/34/50, mobilenet_v2/v3_small/v3_large, "
                                              "efficientnet_b0..b3, or the baseline knn."),
    out: Path = typer.Option(..., "--out", "-o", help="Best checkpoint; model.last.ckpt and model.train/ go beside it."),
    epochs: int = typer.Option(10, help="Epochs to train."),
    batch_size: int = typer.Option(32, help="Images per batch (per process under torchrun)."),
    image_size: int = typer.Option(64, help="Square input size in pixels (stored in the checkpoint)."),
    grayscale: bool = typer.Option(False, "--grayscale", help="One grey channel instead of RGB."),
    weights: Path = typer.Option(None, help="Local torchvision ImageNet state dict (e.g. mobilenet_v2-b0353104.pth)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train only the new head at first."),
    unfreeze_after: int = typer.Option(0, help="With --freeze-backbone: unfreeze after this many epochs (0 = never)."),
    lr: float = typer.Option(None, help="Learning rate (default 1e-3 adamw, 1e-2 sgd)."),
    weight_decay: float = typer.Option(1e-4, help="Weight decay."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd."),
    scheduler: str = typer.Option("cosine", help="cosine, step or none."),
    class_weights: str = typer.Option("none", help="none, loss (inverse-frequency weighted loss) or balanced (sampler)."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing for the loss (0..1)."),
    early_stop: int = typer.Option(0, help="Stop after this many epochs without a better val metric (0 = off)."),
    monitor: str = typer.Option("macro_f1", help="Validation metric for the best checkpoint: macro_f1 or accuracy."),
    augment: str = typer.Option(None, help="Augmentation preset: none, light, line (default) or heavy."),
    resume: Path = typer.Option(None, help="Continue a run: its model.train/resume.safetensors, model.ckpt or dir."),
    init_from: Path = typer.Option(None, help="Fine-tune from a visiond checkpoint (new classes get new head rows)."),
    defect_classes: str = typer.Option(None, help="Comma-separated defect classes, stored in the checkpoint."),
    seed: int = typer.Option(0, help="Seed for initialisation, shuffling and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(-1, help="DataLoader workers (-1: 0 on CPU, up to 8 on CUDA)."),
    knn_k: int = typer.Option(5, help="--arch knn: neighbours that vote."),
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
        class_weights=class_weights, early_stop=early_stop, monitor=monitor, augment=augment or DEFAULT_PRESET,
        resume=resume, init_from=init_from, seed=seed, device=device, workers=workers,
        defect_classes=_csv(defect_classes), knn_k=knn_k, progress=progress, name=name)
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
) -> None:
    """Accuracy, per-class figures, confusion matrix, misclassified images, PR curves, report.md."""
    from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint

    _logging()
    report = evaluate_checkpoint(EvaluateOptions(
        checkpoint=checkpoint, dataset=dataset, split=split, out=out, defect_classes=_csv(defect_classes),
        target_recall=target_recall, write_threshold=write_threshold, device=device, batch_size=batch_size))
    m = report.metrics
    typer.echo(f"{split}: {m['support']} images, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
               f"weighted-F1 {m['weighted_f1']:.4f} -> {out / 'report.md'}")
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
) -> None:
    """Classify images with the daemon's runtime: label, score and top-k per image."""
    from visiond.train.predict import predict_paths, print_table

    results = predict_paths(checkpoint, paths, top_k=top_k, device=device, batch_size=batch_size)
    if json_lines:
        for r in results:
            typer.echo(json.dumps(r))
    else:
        print_table(results)
    if not any(r.get("label") for r in results):
        raise UserError("no image could be read from " + " ".join(paths))


def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to export."),
    format: str = typer.Option(..., "--format", "-f", help="onnx, torchscript, or triton (a Triton model repository)."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write; for triton, the model repository folder."),
    tolerance: float = typer.Option(1e-4, help="Largest allowed difference in probabilities vs PyTorch."),
    opset: int = typer.Option(18, help="ONNX opset."),
    name: str = typer.Option(None, "--name", help="triton: the model's name on the server (default: the "
                                                  "checkpoint's)."),
    max_batch: int = typer.Option(64, "--max-batch", help="triton: max_batch_size, the largest batch the server forms "
                                                          "from all boxes' requests."),
) -> None:
    """Export to ONNX, TorchScript or a Triton model repository: uint8 NHWC in, probabilities out, parity checked."""
    from visiond.models.export import export_checkpoint, export_triton

    if format == "triton":
        result = export_triton(checkpoint, out, name=name, max_batch=max_batch, tolerance=tolerance, opset=opset)
        typer.echo(f"{result.path}: Triton model {result.path.name} (config.pbtxt, labels.txt, 1/model.onnx), max abs "
                   f"difference vs PyTorch {result.max_abs_diff:.3g} (tolerance {tolerance:g}); serve it with "
                   f"`tritonserver --model-repository {out}`")
        return
    result = export_checkpoint(checkpoint, format, out, tolerance=tolerance, opset=opset)
    typer.echo(f"{result.path}: {format}, max abs difference vs PyTorch {result.max_abs_diff:.3g} "
               f"(tolerance {tolerance:g}) on batches {list(result.batch_sizes)}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
    app.command("export")(export)
