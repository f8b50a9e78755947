from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monai_train.__main__ import init_bundle
from worker.inference.bundle import BundleError, load_bundle
from worker.inference.predictor import Predictor


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    init_bundle(out, seed=3)
    return out


def test_cams_come_from_the_same_forward_pass(bundle_dir: Path) -> None:
    predictor = Predictor(load_bundle(bundle_dir))
    rng = np.random.default_rng(0)
    images = [rng.random((300, 280), dtype=np.float32) for _ in range(2)]
    pred = predictor.predict(images)
    assert pred.probabilities.shape == (2, 14)
    assert pred.cams.shape[:2] == (2, 14)
    assert float(pred.cams.max()) <= 1.0 + 1e-6 and float(pred.cams.min()) >= 0.0

    # The CAM identity: mean over space of (W·features) + bias is the logit the network outputs.
    x = predictor.prepare(images)
    cam = predictor._cam_net
    with torch.inference_mode():
        logits = predictor.net(x)
        fmap = torch.relu(cam.features(x))
        raw = torch.einsum("ck,nkhw->nchw", cam.head.weight, fmap).mean(dim=(2, 3))
        raw = raw + cam.head.bias
    np.testing.assert_allclose(raw.numpy(), logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), pred.probabilities, atol=1e-5)


def test_bundle_without_operating_points_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    meta = json.loads((broken / "configs/metadata.json").read_text())
    meta["operating_points"].pop("Hernia")
    (broken / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        load_bundle(broken)


def test_shipped_bundle_loads() -> None:
    from service.core.settings import DEFAULT_BUNDLE

    bundle = load_bundle(DEFAULT_BUNDLE)
    assert len(bundle.labels) == 14 and bundle.labels[0] == "Atelectasis"
    assert len(bundle.sha256) == 64


def test_gradcam_fallback_agrees_with_cam(bundle_dir: Path) -> None:
    """For global pooling + linear head, Grad-CAM at the pooled layer is the CAM up to scale."""
    rng = np.random.default_rng(1)
    images = [rng.random((224, 224), dtype=np.float32)]
    bundle = load_bundle(bundle_dir)
    cam = Predictor(bundle, cam_method="cam").predict(images)
    grad = Predictor(bundle, cam_method="gradcam").predict(images)
    np.testing.assert_allclose(cam.probabilities, grad.probabilities, atol=1e-5)
    small = torch.nn.functional.interpolate(torch.as_tensor(grad.cams), size=cam.cams.shape[2:], mode="area")
    for c in range(14):
        a, b = cam.cams[0, c].ravel(), small[0, c].numpy().ravel()
        if a.std() > 0 and b.std() > 0:
            assert np.corrcoef(a, b)[0, 1] > 0.9


def test_gradcam_plus_plus_in_one_pass_is_monais_gradcampp(bundle_dir: Path) -> None:
    """The closed form (no backward pass) gives MONAI's Grad-CAM++ maps (backward passes), and differs from
    CAM: it keeps only channels whose head weight raises the class score."""
    from monai.visualize.class_activation_maps import GradCAMpp

    rng = np.random.default_rng(4)
    images = [rng.random((224, 224), dtype=np.float32)]
    bundle = load_bundle(bundle_dir)
    pp = Predictor(bundle, cam_method="gradcam++")
    assert pp.backend == "torch"
    cam = Predictor(bundle, cam_method="cam").predict(images)
    pp_unscaled = pp.predict(images)
    np.testing.assert_allclose(pp_unscaled.probabilities, cam.probabilities, atol=1e-5)
    # MONAI adds 1e-7 to the denominator of α, which is of the order of (w / HW)²: scale the head so that
    # its constant does not dominate the reference (both sides use the same, scaled, network).
    with torch.no_grad():
        pp.net.class_layers.out.weight.mul_(10.0)
    ours = pp.predict(images)
    x = pp.prepare(images)
    monai_pp = GradCAMpp(nn_module=pp.net, target_layers="class_layers.relu", postprocessing=lambda m: m)
    with torch.inference_mode():
        scaled_logits = pp.net(x)[0]
    differs, compared = 0, 0
    for c in range(14):
        differs += float(np.abs(pp_unscaled.cams[0, c] - cam.cams[0, c]).max()) > 0.05
        if abs(float(scaled_logits[c])) > 15:  # MONAI multiplies by exp(score): float32 under/overflows
            continue
        compared += 1
        ref = monai_pp.compute_map(x, class_idx=c)[0, 0].detach()  # at the feature map's size, not upsampled
        np.testing.assert_allclose(ours.cams[0, c], (ref / ref.max().clamp_min(1e-8)).numpy(), atol=3e-3)
    assert differs > 0 and compared >= 10


def test_onnx_runtime_backend_matches_torch(tmp_path: Path) -> None:
    """The CPU path (ONNX Runtime, graph exported from the bundle) gives torch's probabilities and maps."""
    out = tmp_path / "bundle"
    init_bundle(out, seed=5)  # export_bundle also writes models/model.onnx
    bundle = load_bundle(out)
    assert (out / "models" / "model.onnx").is_file()
    rng = np.random.default_rng(2)
    images = [rng.random((400, 380), dtype=np.float32) for _ in range(3)]
    onnx = Predictor(bundle, backend="onnx")
    torch_ = Predictor(bundle, backend="torch")
    assert onnx.backend == "onnx" and Predictor(bundle).backend == "onnx"
    a, b = onnx.predict(images), torch_.predict(images)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    np.testing.assert_allclose(a.cams, b.cams, atol=1e-4)


def test_precision_defaults_to_fp32_on_the_cpu_and_onnx_refuses_reduced_precision(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert Predictor(bundle, backend="torch").precision == "fp32"
    with pytest.raises(ValueError, match="fp32"):
        Predictor(bundle, backend="onnx", precision="bf16")
    with pytest.raises(ValueError):
        Predictor(bundle, precision="int3")


def test_bf16_autocast_gives_the_fp32_answer_within_reduced_precision(bundle_dir: Path) -> None:
    """The GPU path's autocast code, run on the CPU (which has bf16 autocast too)."""
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(7)
    images = [rng.random((256, 256), dtype=np.float32) for _ in range(3)]
    ref = Predictor(bundle, backend="torch", precision="fp32").predict(images)
    half = Predictor(bundle, backend="torch", precision="bf16")
    assert half.description == {"device": "cpu", "precision": "bf16", "backend": "torch"}
    got = half.predict(images)
    assert got.probabilities.dtype == np.float32 and got.cams.dtype == np.float32
    np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=0.03)
    # Same maps up to bf16 rounding: compare where they matter, not pixel noise.
    corr = np.corrcoef(got.cams.ravel(), ref.cams.ravel())[0, 1]
    assert corr > 0.98


@pytest.mark.gpu
def test_gpu_autocast_matches_the_cpu(bundle_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker was selected, but torch sees no CUDA device")
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(11)
    images = [rng.random((512, 512), dtype=np.float32) for _ in range(8)]
    ref = Predictor(bundle, backend="torch").predict(images)
    for precision in ("auto", "fp16", "fp32"):
        gpu = Predictor(bundle, device="cuda", precision=precision)
        assert gpu.device.type == "cuda" and gpu.backend == "torch"
        got = gpu.predict(images)
        np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=0.03)


def test_a_worker_asked_for_a_missing_gpu_refuses_to_start(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has the GPU the test asks for")
    env = {**os.environ, "CXR_DATA_DIR": str(tmp_path), "CXR_INFERENCE_DEVICE": "cuda"}
    run = subprocess.run(
        [sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 1
    assert "torch sees no CUDA device" in run.stderr
