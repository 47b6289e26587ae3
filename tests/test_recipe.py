"""The training recipe, piece by piece: what each default does, checked on tiny data.

Folded grey convolution, input size and colour defaults, layer-wise learning rates, warm-up
then cosine, the weights' moving average being what is validated and saved, BatchNorm frozen
for small batches from weights, the safe augmentation preset, and rank 0's early-stop decision
reaching every process.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from shapes import make_split_shapes_dataset
from visiond.data.augment import DEFAULT_PRESET, build_augmentation, resolve_auto
from visiond.models.arch import SmallCNN, SmallCNNv2, build_model
from visiond.models.checkpoint import load_checkpoint
from visiond.preprocess import PreprocessSpec
from visiond.train import recipe, transfer
from visiond.train.data import load_splits
from visiond.train.ema import ModelEMA
from visiond.train.engine import TrainableModel
from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint
from visiond.train.loop import TrainOptions, train
from visiond.train.state import ResumeState


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_split_shapes_dataset(tmp_path_factory.mktemp("shapes"), per_class=30, size=32, seed=4)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory) -> tuple[Path, dict]:
    """A locally produced torchvision ImageNet-shaped state dict (no weights can be downloaded here),
    with BatchNorm statistics that are not the defaults, as trained ones would be."""
    torch.manual_seed(5)
    net = torchvision.models.mobilenet_v3_small(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small-imagenet.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def opts_for(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=data, out=out, image_size=32, epochs=2, batch_size=16, progress=False)
    return TrainOptions(**(base | kw))


def _first_block(net: torch.nn.Module, spec: PreprocessSpec, image: torch.Tensor) -> torch.Tensor:
    """mobilenet_v3_small's first conv + BatchNorm + activation, evaluated through the runtime's normalisation."""
    model = TrainableModel(net, spec).eval()
    seen = {}
    net.features[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.inference_mode():
        model(image)
    return seen["out"]


def test_grey_input_folds_the_rgb_first_convolution_and_matches_the_tripled_image(imagenet_file, tmp_path):
    weights, _ = imagenet_file
    gray_spec = PreprocessSpec.for_color(64, "gray")
    rgb_spec = PreprocessSpec.for_color(64, "rgb", imagenet=True)
    # given the same ImageNet file loaded into a grey (1-channel) and an RGB network
    gray = build_model("mobilenet_v3_small", 3, in_channels=1, image_size=64)
    rgb = build_model("mobilenet_v3_small", 3, in_channels=3, image_size=64)
    transfer.load_imagenet_weights(gray, weights, "mobilenet_v3_small", gray_spec)
    transfer.load_imagenet_weights(rgb, weights, "mobilenet_v3_small", rgb_spec)
    # then the grey network's first convolution has one input channel: a third of the work, no tripled image
    assert gray.features[0][0].weight.shape[1] == 1
    # and on a grey image its first block equals the RGB network's on the tripled image (away from the padded border)
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 1, 64, 64), dtype=np.uint8))
    folded = _first_block(gray, gray_spec, image)
    tripled = _first_block(rgb, rgb_spec, image.expand(-1, 3, -1, -1).contiguous())
    assert folded.shape == tripled.shape
    torch.testing.assert_close(folded[:, :, 1:-1, 1:-1], tripled[:, :, 1:-1, 1:-1], atol=1e-4, rtol=1e-4)
    # while the plain sum over colour (the old fold) is off by the normalisation's difference
    naive = build_model("mobilenet_v3_small", 3, in_channels=1, image_size=64)
    naive.load_state_dict(gray.state_dict())
    with torch.no_grad():
        naive.features[0][0].weight.copy_(torch.load(weights)["features.0.0.weight"].sum(1, keepdim=True))
    assert not torch.allclose(_first_block(naive, gray_spec, image)[:, :, 1:-1, 1:-1],
                              tripled[:, :, 1:-1, 1:-1], atol=1e-2)


def test_input_size_and_colour_follow_the_weights_and_the_images(tmp_path, imagenet_file):
    # given a dataset of 28 x 28 images stored grey (as Fashion-MNIST's)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "grey" / c).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(tmp_path / "grey" / c / f"{i}.png"), rng.integers(0, 256, (28, 28), dtype=np.uint8))
    splits = load_splits(tmp_path / "grey")
    out = tmp_path / "m.ckpt"
    # then from scratch: the images' own size rounded up to 8 (not upscaled to 64), one grey channel
    spec = recipe.preprocess_spec(TrainOptions(data=tmp_path / "grey", out=out), None, splits)
    assert (spec.height, spec.width, spec.color) == (32, 32, "gray")
    # from ImageNet weights: the size they were trained at
    weights, _ = imagenet_file
    spec = recipe.preprocess_spec(TrainOptions(data=tmp_path / "grey", out=out, arch="mobilenet_v3_small",
                                               weights=weights), None, splits)
    assert (spec.height, spec.color) == (224, "gray")
    assert recipe.default_image_size(TrainOptions(data=tmp_path, out=out, arch="efficientnet_b3", weights=weights),
                                     None) == 300
    # and what the user says wins
    spec = recipe.preprocess_spec(TrainOptions(data=tmp_path / "grey", out=out, image_size=48, grayscale=False),
                                  None, splits)
    assert (spec.height, spec.color) == (48, "rgb")


def test_from_weights_the_backbone_learns_at_a_tenth_of_the_head(imagenet_file, tmp_path):
    weights, _ = imagenet_file
    opts = opts_for(tmp_path, tmp_path / "m.ckpt", arch="mobilenet_v3_small", weights=weights)
    net, _ = recipe.build_network(opts, ["a", "b", "c"], PreprocessSpec.for_color(32, imagenet=True), None)
    optimizer = recipe.make_optimizer(opts, net)
    groups = {g["name"]: g for g in optimizer.param_groups}
    # then the pretrained layers learn at backbone_lr x the head's rate, the new head at the full rate
    assert set(groups) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["backbone"]["lr"] == pytest.approx(1e-4)
    head_params = {id(p) for p in net.classifier[3].parameters()}
    assert {id(p) for p in groups["head"]["params"] + groups["head/no_decay"]["params"]} == head_params
    # biases and norm scales are not decayed; every parameter is in exactly one group
    assert groups["backbone/no_decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in groups["backbone/no_decay"]["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    # from scratch every layer learns at the full rate
    scratch = opts_for(tmp_path, tmp_path / "m.ckpt")
    small, _ = recipe.build_network(scratch, ["a", "b"], PreprocessSpec.for_color(32), None)
    assert isinstance(small, SmallCNN)  # v1 stays the default (v2: opt-in, see arch.SMALLCNN_VERSION)
    assert [g["lr"] for g in recipe.make_optimizer(scratch, small).param_groups] == [2e-3, 2e-3]


def test_warm_up_then_cosine_per_step():
    # given 10 epochs of 100 steps and a one-epoch warm-up
    opts = TrainOptions(data=".", out="m.ckpt", epochs=10, lr=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = recipe.make_scheduler(opts, optimizer, steps_per_epoch=100)
    lrs = []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # then the rate climbs linearly over the first 100 steps, from near 0 to the full rate ...
    assert lrs[0] == pytest.approx(1 / 101) and lrs[99] == pytest.approx(100 / 101)
    assert all(b > a for a, b in zip(lrs[:100], lrs[1:101]))
    # ... and then falls along a half cosine: the full rate, half at the middle of the rest, near 0 at the end
    assert lrs[100] == pytest.approx(1.0)
    assert lrs[550] == pytest.approx(0.5, abs=1e-9)
    assert lrs[999] < 1e-4 and all(b <= a for a, b in zip(lrs[100:], lrs[101:]))
    # a short run warms up for at most a fifth of its steps
    assert recipe.warmup_steps(TrainOptions(data=".", out="m.ckpt", epochs=2), 10) == 4


def test_the_moving_average_is_what_is_validated_and_saved(shapes, tmp_path):
    # when the default recipe trains the small CNN for two epochs
    out = tmp_path / "m.ckpt"
    result = train(opts_for(shapes, out, epochs=2))
    # then the saved weights are the moving average kept in the resume file, not the last step's weights
    resume = ResumeState(tmp_path / "m.train" / "resume.safetensors")
    last = load_checkpoint(tmp_path / "m.last.ckpt").state_dict
    assert resume.ema_state is not None and resume.info["ema_updates"] > 0
    for k, v in last.items():
        assert torch.equal(v, resume.ema_state[k]), k
    assert any(not torch.equal(last[k], resume.model_state[k]) for k in last if last[k].is_floating_point())
    # and the validation figure of the best epoch is the saved model's on the validation split
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=out, dataset=shapes, split="val", out=tmp_path / "e"))
    assert report.metrics["accuracy"] == pytest.approx(result.best_metrics["accuracy"])
    # and the checkpoint names the augmentation `auto` chose for 18 images a class (what TTA reads), not `auto`
    assert load_checkpoint(out).meta["train_options"]["augment"] == "safe"


def test_moving_average_follows_the_weights_with_a_ramped_decay():
    net = torch.nn.Linear(2, 1)
    ema = ModelEMA(net, decay=0.999)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    # the first update's decay is (1 + 1) / (10 + 1), not 0.999: a short run is not stuck at its initialisation
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, start * d + (start + 1.0) * (1 - d))
    for _ in range(10_000):
        ema.update(net)
    assert ema.current_decay() == 0.999
    torch.testing.assert_close(ema.module.weight, net.weight.detach(), atol=1e-4, rtol=0)


def test_small_batches_from_weights_keep_the_pretrained_batchnorm_statistics(shapes, imagenet_file, tmp_path):
    weights, state = imagenet_file
    key = "features.1.block.0.1.running_mean"  # a BatchNorm layer of the backbone
    kw = dict(arch="mobilenet_v3_small", weights=weights, epochs=1, batch_size=8, ema=0.0)
    # when fine-tuning with 8 images a batch (auto: frozen below 16)
    train(opts_for(shapes, tmp_path / "f.ckpt", **kw))
    # then every BatchNorm layer keeps the file's statistics while the weights around it train
    frozen = load_checkpoint(tmp_path / "f.ckpt").state_dict
    assert torch.equal(frozen[key], state[key])
    assert not torch.equal(frozen["features.1.block.0.0.weight"], state["features.1.block.0.0.weight"])
    # and with batchnorm=train the statistics move
    train(opts_for(shapes, tmp_path / "t.ckpt", batchnorm="train", **kw))
    assert not torch.equal(load_checkpoint(tmp_path / "t.ckpt").state_dict[key], state[key])


def test_the_default_augmentation_is_safe_for_small_sets_and_none_where_every_class_has_thousands():
    assert DEFAULT_PRESET == "auto" and TrainOptions(data=".", out="m.ckpt").augment == "auto"
    # a plant's few hundred photos a class (or one rare defect among many good parts) get the safe preset
    assert resolve_auto("auto", [240, 240, 240])[0] == "safe"
    assert resolve_auto("auto", [50_000, 30])[0] == "safe"
    # a set where even the smallest class has thousands (Fashion-MNIST: 5,400) trains on the images as they are
    preset, why = resolve_auto("auto", [5400] * 10)
    assert preset == "none" and "5400" in why
    # a preset named on the command line is kept whatever the data
    assert resolve_auto("safe", [5400] * 10) == ("safe", "")


def test_the_safe_preset_never_flips_vertically():
    # given an image bright at the top and at the left
    spec = PreprocessSpec.for_color(32, "gray")
    x = torch.zeros((1, 32, 32), dtype=torch.uint8)
    x[:, :12, :] = 255
    x[:, :, :6] = 200
    aug = build_augmentation("safe", spec)
    torch.manual_seed(0)
    outs = [aug(x).float() for _ in range(60)]
    # then the top always stays on top (no vertical flip, only small turns) ...
    assert all(o[:, :10].mean() > o[:, -10:].mean() + 30 for o in outs)
    # ... while left and right do swap (horizontal flips)
    assert any(o[:, 14:, -4:].mean() > o[:, 14:, :4].mean() for o in outs)
    # and some images lose a rectangle (erasing: turns and crops leave the middle of a white image white)
    white = torch.full((1, 32, 32), 255, dtype=torch.uint8)
    erased = [aug(white)[:, 8:24, 8:24].eq(0).sum().item() for _ in range(60)]
    assert 0 < sum(n > 0 for n in erased) < 40


def test_old_smallcnn_checkpoints_still_build_the_seed_network():
    # a checkpoint saved before version 2 carries no version: it must load into the seed's layers
    assert isinstance(build_model("smallcnn", 3, 3, 32), SmallCNN)
    assert isinstance(build_model("smallcnn", 3, 3, 32, version=2), SmallCNNv2)
    with pytest.raises(ValueError, match="version"):
        build_model("smallcnn", 3, 3, 32, version=7)


def _decide(rank: int, world: int, init_file: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        procs = recipe.Processes(rank, world, torch.device("cpu"))
        # each rank saw its own validation figures: rank 1 would stop, rank 0 would not
        results[rank] = recipe.rank0_decides(procs, rank == 0, rank == 1)
    finally:
        dist.destroy_process_group()


def test_rank0_decides_early_stopping_for_every_process(tmp_path):
    # given two gloo processes whose own improved/stop verdicts disagree
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_decide, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
        # then both act on rank 0's: improved, and go on (no rank leaves the other waiting)
        assert dict(results) == {0: (True, False), 1: (True, False)}
    # and one process needs no broadcast
    assert recipe.rank0_decides(recipe.Processes(0, 1, torch.device("cpu")), True, False) == (True, False)
