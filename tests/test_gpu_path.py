"""The GPU path, tested where no GPU is: every placement decision as a pure function of torch.device values,
and the real predict_images paths (CPU resize, torch resize, frames already 'on the device') run on the CPU.

The CUDA crash this guards against: `resolve_device("auto")` gave `torch.device("cuda")` while tensors report
`cuda:0`, the two compared unequal, and a frame already on the GPU was `pin_memory()`-ed: the inference thread
died on the first real frame. A GPU is mocked only where it is absent (torch.cuda's availability queries).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

from test_export import make_checkpoint
from test_synthline import decoded_frames  # every frame OpenCV decodes from a file
from visiond.config import parse_config
from visiond.models.checkpoint import CheckpointError, load_checkpoint
from visiond.models.devices import choose_device, model_dtype, move_for, needs_pinning, resize_site, same_device
from visiond.models.runtime import TorchClassifier, resolve_device, warm_up
from visiond.preprocess import DeviceFrame, device_tensor_of, gpu_resize_uint8, stack_uint8

CUDA, CUDA0, CUDA1, CPU = torch.device("cuda"), torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("gpu") / "m.ckpt", "smallcnn", 48))


def _frames(n: int, shape=(1080, 1920, 3), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth content: resize by cv2 and by torch then agree to a level, as on real footage
    return [cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (15, 15), 5) for _ in range(n)]


# ---------------------------------------------------------------- the device decisions, no GPU needed


def test_the_trap_two_spellings_of_one_cuda_device_compare_unequal_in_torch():
    # the reason a helper exists: torch's own == says cuda != cuda:0
    assert CUDA != CUDA0
    assert same_device(CUDA, CUDA0) and same_device(CUDA0, CUDA)


def test_resolve_device_auto_gives_an_indexed_cuda_device(monkeypatch):
    # given a machine with two GPUs, the current one being 1 (torch.cuda's queries mocked: no GPU here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    # when the daemon resolves the default model.device, and plain 'cuda'
    auto, cuda = resolve_device("auto"), resolve_device("cuda")
    # then both name the device with its index, as every tensor on it reports (failed before: index None)
    assert (auto.type, auto.index) == ("cuda", 1) and str(auto) == "cuda:1"
    assert (cuda.type, cuda.index) == ("cuda", 1)
    assert resolve_device("cuda:0") == CUDA0
    # and a tensor already on that GPU (what the GPU resize hands the model) is neither moved nor pinned
    frame_on_gpu = torch.device("cuda", 1)
    assert move_for(frame_on_gpu, auto, current=1) == "none"
    assert not needs_pinning(frame_on_gpu, auto, pinned=False, current=1)


@pytest.mark.parametrize("requested,available,count,current,want", [
    ("auto", False, 0, 0, "cpu"), ("cpu", True, 1, 0, "cpu"), ("auto", True, 1, 0, "cuda:0"),
    ("cuda", True, 2, 1, "cuda:1"), ("cuda:1", True, 2, 0, "cuda:1")])
def test_choose_device(requested, available, count, current, want):
    assert choose_device(requested, cuda_available=available, device_count=count, current=current) == torch.device(want)


@pytest.mark.parametrize("requested,available,count,message", [
    ("cuda", False, 0, "no CUDA device is available here; use auto or cpu"),
    ("cuda:2", True, 2, "only 2 CUDA device(s) present"),
    ("gpu", True, 1, "expected auto, cpu, cuda or cuda:N")])
def test_a_device_this_machine_lacks_is_a_one_line_error(requested, available, count, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_device(requested, cuda_available=available, device_count=count)


@pytest.mark.parametrize("a,b,current,same", [
    (CUDA, CUDA0, 0, True), (CUDA0, CUDA0, 0, True), (CUDA, CUDA1, 0, False), (CUDA, CUDA1, 1, True),
    (CUDA0, CUDA1, 0, False), (CPU, torch.device("cpu", 0), 0, True), (CPU, CUDA0, 0, False)])
def test_same_device_compares_type_and_index(a, b, current, same):
    assert same_device(a, b, current) is same and same_device(b, a, current) is same


@pytest.mark.parametrize("src,dst,pinned,move,pin", [
    (CUDA0, CUDA, False, "none", False),      # the crash: a GPU tensor was pinned
    (CPU, CUDA, False, "upload", True),       # pageable host memory: stage it pinned
    (CPU, CUDA0, True, "upload", False),      # already pinned (the staging slot): upload as is
    (CUDA0, CPU, False, "download", False),
    (CUDA0, CUDA1, False, "peer", False),
    (CPU, CPU, False, "none", False)])
def test_move_and_pinning_decisions(src, dst, pinned, move, pin):
    assert move_for(src, dst) == move
    assert needs_pinning(src, dst, pinned=pinned) is pin


@pytest.mark.parametrize("device,precision,dtype", [
    ("cuda:0", "auto", torch.float16), ("cuda:0", "fp16", torch.float16), ("cuda:0", "bf16", torch.bfloat16),
    ("cuda:0", "fp32", torch.float32), ("cpu", "auto", torch.float32), ("cpu", "fp16", torch.float32),
    ("cpu", "bf16", torch.bfloat16)])
def test_model_dtype(device, precision, dtype):
    assert model_dtype(torch.device(device), precision) == dtype


@pytest.mark.parametrize("resize_on,spec_resize,on_device,measured,site", [
    ("auto", "linear", False, None, "host"),      # auto: the CPU until measured
    ("auto", "linear", False, "device", "device"),
    ("cpu", "linear", False, "device", "host"),
    ("gpu", "linear", False, None, "device"),
    ("cpu", "linear", True, None, "device"),      # NVDEC frames are resized where they are
    ("gpu", "area", True, None, "host"),          # no torch twin for area: the host copy is resized
])
def test_resize_site(resize_on, spec_resize, on_device, measured, site):
    assert resize_site(resize_on, spec_resize, frames_on_device=on_device, measured=measured) == site


def test_a_bad_resize_on_is_refused_at_load(ckpt):
    with pytest.raises(ValueError, match="model.resize_on 'sometimes': expected one of cpu, gpu, auto"):
        TorchClassifier(ckpt, device="cpu", resize_on="sometimes")


# ---------------------------------------------------------------- the real paths, on the CPU


def test_full_hd_frames_give_the_same_verdicts_through_every_resize_path(ckpt):
    # given full-HD frames (the size that took the crashing branch) and one ROI view of one
    frames = _frames(3)
    frames.append(frames[0][100:700, 300:1100])
    want = TorchClassifier(ckpt, device="cpu", precision="fp32", resize_on="cpu").predict_images(frames)
    # when classified with the torch resize (the GPU path, run on the CPU) and with auto
    got_gpu = TorchClassifier(ckpt, device="cpu", precision="fp32", resize_on="gpu").predict_images(frames)
    got_auto = TorchClassifier(ckpt, device="cpu", precision="fp32", resize_on="auto").predict_images(frames)
    # then every frame gets the same probabilities, in order
    assert want.shape == got_gpu.shape == (4, len(ckpt.classes))
    assert np.abs(got_gpu - want).max() < 0.02
    assert np.array_equal(got_auto, want)


def test_frames_decoded_on_the_device_are_classified_without_a_copy(ckpt):
    # given frames a GPU decoder hands over (host pixels + the device copy; here the 'device' is the CPU)
    host = _frames(2, (720, 1280, 3), seed=1)
    dev_frames = [DeviceFrame(f, torch.from_numpy(f.copy())) for f in host]
    # when the camera ROI and an inspection ROI crop them, as sources and the worker do
    crops = [f[40:680, 100:1200][10:500, 20:900] for f in dev_frames]
    # then the crops still carry their device views, of the same pixels
    for c in crops:
        assert isinstance(c, DeviceFrame) and tuple(device_tensor_of(c).shape) == c.shape
        assert np.array_equal(device_tensor_of(c).numpy(), np.asarray(c))
    # and the model reads those device views: the same verdicts as the host path, with no upload
    clf = TorchClassifier(ckpt, device="cpu", precision="fp32", resize_on="cpu")
    want = clf.predict_images([np.ascontiguousarray(c) for c in crops])
    assert np.abs(clf.predict_images(crops) - want).max() < 0.02
    # anything that is not a basic slice is an ordinary host array
    assert device_tensor_of(dev_frames[0][::-1]) is None and device_tensor_of(dev_frames[0] + 1) is None


def test_the_batched_torch_resize_keeps_frame_order_across_mixed_sizes(ckpt):
    # given a batch that mixes three frame sizes (several cameras), interleaved
    a, b, c = _frames(2, (480, 640, 3), 2), _frames(2, (300, 200, 3), 3), _frames(1, (90, 120), 4)
    batch = [a[0], b[0], c[0], a[1], b[1]]
    tensors = [torch.from_numpy(np.ascontiguousarray(f)) for f in batch]
    # when resized in one call (one interpolate per size)
    got = gpu_resize_uint8(tensors, ckpt.spec).numpy().astype(int)
    # then each output row is its own frame, as the CPU path makes it
    want = stack_uint8(batch, ckpt.spec).astype(int)
    assert np.abs(got - want).max() <= 1


def test_submitted_batches_collect_in_any_order_to_their_own_probabilities(ckpt):
    clf = TorchClassifier(ckpt, device="cpu", precision="fp32", resize_on="gpu")
    one, two = _frames(3, (400, 500, 3), 5), _frames(2, (400, 500, 3), 6)
    p1, p2 = clf.submit_images(one), clf.submit_images(two)  # pipelined: the second starts before the first is read
    assert np.array_equal(clf.collect(p2), clf.predict_images(two))
    assert np.array_equal(clf.collect(p1), clf.predict_images(one))


def test_bf16_is_cast_once_and_agrees_with_fp32(ckpt):
    fp32 = TorchClassifier(ckpt, device="cpu", precision="fp32")
    bf16 = TorchClassifier(ckpt, device="cpu", precision="bf16")
    # the weights are cast at load (no autocast re-casting them every batch)
    assert {p.dtype for p in bf16._model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32._model.parameters()} == {torch.float32}
    frames = _frames(6, (240, 320, 3), 7)
    got, want = bf16.predict_images(frames), fp32.predict_images(frames)
    assert got.dtype == np.float32 and np.allclose(got.sum(1), 1, atol=1e-5)
    assert np.abs(got - want).max() < 0.03


def test_warm_up_runs_the_predict_images_path_with_the_cameras_frame_sizes(ckpt, monkeypatch):
    clf = TorchClassifier(ckpt, device="cpu")
    seen = []
    real = clf.predict_images
    monkeypatch.setattr(clf, "predict_images", lambda images: seen.append((len(images), images[0].shape))
                        or real(images))
    warm_up(clf, 4, [(1080, 1920, 3), (200, 300, 3), (1080, 1920, 3)])
    assert seen == [(1, (1080, 1920, 3)), (4, (1080, 1920, 3)), (1, (200, 300, 3)), (4, (200, 300, 3))]


def test_the_daemon_warms_up_with_its_cameras_roi_and_video_sizes(tmp_path, ckpt, caplog):
    from visiond.serve.control import warmup_shapes

    video = tmp_path / "line.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 240))
    for _ in range(3):
        writer.write(np.zeros((240, 320, 3), np.uint8))
    writer.release()
    cfg = parse_config({
        "cameras": [{"name": "a", "source": str(video)},
                    {"name": "b", "source": "rtsp://cam/x", "roi": [0, 0, 640, 480]},
                    {"name": "c", "source": "rtsp://cam/y", "rois": [{"name": "l", "rect": [0, 0, 100, 50]},
                                                                     {"name": "r", "rect": [0, 0, 100, 50]}]},
                    {"name": "d", "source": "rtsp://cam/z"}],
        "model": {"checkpoint": "m.ckpt"}})
    assert warmup_shapes(cfg) == [(240, 320, 3), (480, 640, 3), (50, 100, 3), (1080, 1920, 3)]
    with caplog.at_level(logging.INFO):
        warm_up(TorchClassifier(ckpt, device="cpu"), 2, warmup_shapes(cfg))


# ---------------------------------------------------------------- NVDEC decode and its fall-back


def _h264(path, frames: int = 12, size: str = "320x240"):
    import subprocess

    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30",
                    "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "5", str(path)],
                   check=True, timeout=60)
    return path


@pytest.mark.parametrize("decode,level", [("nvdec", logging.WARNING), ("auto", logging.INFO)])
def test_without_nvdec_a_video_file_decodes_with_opencv_and_says_so_once(tmp_path, caplog, decode, level):
    from test_sources import Harness
    from visiond.config import CameraConfig
    from visiond.serve.nvdec import nvdec_unavailable

    if nvdec_unavailable("file") is None:
        pytest.skip("NVDEC can decode here: the fall-back is exercised on machines without a GPU")
    video = _h264(tmp_path / "line.mp4")
    # given a camera that asks for GPU decoding (or auto) on this machine, where NVDEC cannot run
    cfg = CameraConfig(name="cam", source=str(video), decode=decode, loop=True)
    with caplog.at_level(logging.DEBUG, logger="visiond.serve.nvdec"), Harness(cfg) as h:
        # when it plays the file twice over (loop: two opens)
        frames = h.take(24)
    # then every frame arrives, decoded by OpenCV, pixel for pixel
    want = decoded_frames(video)
    assert len(frames) == 24
    assert all(np.array_equal(f.image, want[i % 12]) for i, f in enumerate(frames))
    assert all(device_tensor_of(f.image) is None for f in frames)
    # and one line said why, once (not per open)
    lines = [r for r in caplog.records if r.name == "visiond.serve.nvdec"]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (level, f"camera cam: decode {decode}: {nvdec_unavailable('file')}; decoding with OpenCV on the CPU")]


def test_nv12_to_bgr_matches_opencv(tmp_path):
    from visiond.serve.nvdec import nv12_to_bgr

    # given an NV12 image (as NVDEC hands over), made by OpenCV from a real frame
    bgr = decoded_frames(_h264(tmp_path / "a.mp4", frames=1, size="336x200"))[0]
    h, w = bgr.shape[:2]
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)
    u = i420[h:h + h // 4].reshape(-1)
    v = i420[h + h // 4:].reshape(-1)
    nv12 = np.concatenate([i420[:h].reshape(-1), np.stack([u, v], 1).reshape(-1)]).reshape(h * 3 // 2, w)
    # when converted by the GPU code (on a CPU tensor here) and by OpenCV
    got = nv12_to_bgr(torch.from_numpy(nv12), h, w).numpy().astype(int)
    want = cv2.cvtColor(nv12, cv2.COLOR_YUV2BGR_NV12).astype(int)
    # then the model sees the same pixels either way
    assert got.shape == want.shape == (h, w, 3)
    assert np.abs(got - want).max() <= 2


def test_the_rtsp_demux_hands_nvdec_annex_b_packets_a_decoder_accepts(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the visiond[gpu] extra) demuxes RTSP for NVDEC")
    from visiond.serve.nvdec import annexb_payloads

    # given an H.264 MP4 (avcC: length-prefixed NAL units, which NVDEC cannot read)
    video = _h264(tmp_path / "line.mp4", frames=12)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        # when demuxed the way RTSP cameras are
        payloads = list(annexb_payloads(container, stream))
    # then every packet starts with an Annex-B start code, and the bitstream decodes to every frame
    assert len(payloads) == 12 and all(p[:4] == b"\x00\x00\x00\x01" or p[:3] == b"\x00\x00\x01" for p in payloads)
    decoder = av.CodecContext.create("h264", "r")
    frames = [f for p in payloads for f in decoder.decode(av.Packet(p))] + list(decoder.decode(None))
    assert len(frames) == 12 and (frames[0].height, frames[0].width) == (240, 320)


def _nvdec_or_skip():
    from visiond.serve.nvdec import nvdec_unavailable

    why = nvdec_unavailable("file")
    if why is not None:
        pytest.skip(f"NVDEC decode not exercised: {why}")


def test_nvdec_decodes_a_video_file_into_frames_on_the_gpu(tmp_path, ckpt):
    _nvdec_or_skip()
    from visiond.config import CameraConfig
    from visiond.serve.nvdec import NvdecCapture

    video = _h264(tmp_path / "line.mp4", frames=30, size="1920x1080")
    cap = NvdecCapture(str(video), CameraConfig(name="cam", source=str(video), decode="nvdec"))
    frames = []
    while cap.grab():
        frames.append(cap.retrieve()[1])
    cap.release()
    want = decoded_frames(video)
    assert len(frames) == len(want) == 30
    for got, ref in zip(frames, want):
        t = device_tensor_of(got)
        assert t is not None and t.device.type == "cuda" and got.shape == ref.shape
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3
    # and the model reads the GPU copies (no upload) with the verdicts of the OpenCV frames
    clf = TorchClassifier(ckpt, device="cuda", precision="fp32")
    assert np.abs(clf.predict_images(frames[:8]) - clf.predict_images(want[:8])).max() < 0.05


def test_a_codec_nvdec_does_not_take_falls_back_to_opencv(tmp_path, caplog):
    _nvdec_or_skip()
    from test_sources import Harness
    from visiond.config import CameraConfig

    video = tmp_path / "mjpeg.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (320, 240))
    for i in range(5):
        writer.write(np.full((240, 320, 3), i * 40, np.uint8))
    writer.release()
    with caplog.at_level(logging.WARNING, logger="visiond.serve.nvdec"), \
            Harness(CameraConfig(name="cam", source=str(video), decode="nvdec")) as h:
        frames = h.drain_all()
    assert len(frames) == 5
    assert any("decoding with OpenCV on the CPU" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- ONNX Runtime's GPU providers (visiond[gpu])

_TRT, _CUDA, _CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.mark.parametrize("available,device,gpus,want", [
    ([_CPU], "auto", 1, [_CPU]),                      # onnxruntime (CPU build): the CPU, as before
    ([_TRT, _CUDA, _CPU], "auto", 0, [_CPU]),         # onnxruntime-gpu but no GPU
    ([_TRT, _CUDA, _CPU], "cpu", 1, [_CPU]),          # device cpu never picks a GPU
    ([_CUDA, _CPU], "auto", 1, [_CUDA, _CPU]),
    ([_TRT, _CUDA, _CPU], "cuda:1", 2, [_TRT, _CUDA, _CPU])])
def test_onnxruntime_providers_follow_what_is_installed_and_present(tmp_path, available, device, gpus, want):
    from visiond.models.onnx_runtime import choose_providers

    got = choose_providers(available, device, cuda_devices=gpus, cache_dir=tmp_path)
    assert [p if isinstance(p, str) else p[0] for p in got] == want
    for p in got:
        if not isinstance(p, str):
            assert p[1]["device_id"] == (1 if device == "cuda:1" else 0)
            if p[0] == _TRT:
                assert p[1]["trt_engine_cache_path"] == str(tmp_path / "tensorrt")


def test_onnxruntime_asked_for_a_gpu_it_cannot_use_runs_on_the_cpu_and_says_why(ckpt, tmp_path, caplog):
    from visiond.models.runtime import make_classifier

    with caplog.at_level(logging.INFO, logger="visiond.models.onnx_runtime"):
        clf = make_classifier(ckpt, runtime="onnxruntime", device="cuda:0", cache_dir=tmp_path)
    assert clf.runtime == "onnxruntime" and clf.device == "cpu"
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("onnxruntime: model.device cuda:0 asks for a GPU, but ") and m.endswith("running on the CPU")
               for m in msgs)
    assert any(m.endswith("onnxruntime on cpu (providers CPUExecutionProvider)") for m in msgs)


def test_the_knn_baseline_is_never_cast_to_half(tmp_path):
    from visiond.models.arch import build_model
    from visiond.models.checkpoint import save_checkpoint
    from visiond.preprocess import PreprocessSpec

    torch.manual_seed(0)
    net = build_model("knn", 3, 3, 32, n_train=8)
    net.fit(torch.randn(8, net.train_x.shape[1]) * 1e-3 + 1.0, torch.arange(8) % 3)  # close neighbours
    ck = save_checkpoint(tmp_path / "knn.ckpt", arch="knn", classes=["a", "b", "c"], spec=PreprocessSpec.for_color(32),
                         state_dict=net.state_dict(), arch_args={"in_channels": 3, "image_size": 32, "n_train": 8})
    clf = TorchClassifier(ck, device="cpu", precision="bf16")
    assert clf.dtype == torch.float32 and clf._model.train_x.dtype == torch.float32
