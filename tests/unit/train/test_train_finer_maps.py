"""Finer heatmaps: DenseNet-121 with pool-free last transitions, from a bundle config, in the worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121

from monai_train.bundle import NIH_LABELS, export_untrained, inference_config
from worker.inference.bundle import load_bundle
from worker.inference.networks import DenseNet121Fine, feature_stride
from worker.inference.predictor import Predictor


def test_pool_free_transitions_give_16_by_16_maps_at_128_with_densenet121_weights() -> None:
    fine = DenseNet121Fine(spatial_dims=2, in_channels=1, out_channels=3, pool_free_transitions=(2, 3)).eval()
    plain = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
    assert {k: v.shape for k, v in fine.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    with torch.inference_mode():
        assert fine.features(torch.zeros(1, 1, 128, 128)).shape[2:] == (16, 16)
    assert feature_stride((2, 3)) == 8 and feature_stride(()) == 32
    with pytest.raises(ValueError):
        DenseNet121Fine(spatial_dims=2, in_channels=1, out_channels=3, pool_free_transitions=(4,))
    with pytest.raises(ValueError):
        inference_config(14, 128, feature_stride=4)


def test_a_fine_bundle_runs_in_the_worker(tmp_path: Path) -> None:
    cfg = inference_config(len(NIH_LABELS), 64, feature_stride=8)
    assert cfg["network_def"]["_target_"] == "worker.inference.networks.DenseNet121Fine"
    export_untrained(tmp_path / "b", cfg, seed=0, name="fine", version="0", model_card="test", onnx=False)
    pred = Predictor(load_bundle(tmp_path / "b"), threads=1).predict([np.full((200, 180), 0.5, np.float32)])
    assert pred.cams.shape == (1, 14, 8, 8) and pred.probabilities.shape == (1, 14)


def test_histogram_equalisation_is_part_of_the_bundle_preprocessing(tmp_path: Path) -> None:
    from monai_train.bundle import build_preprocessing

    cfg = inference_config(len(NIH_LABELS), 32, histogram_equalise=True)
    targets = [t["_target_"] for t in cfg["preprocessing"]["transforms"]]
    assert targets[1] == "monai.transforms.HistogramNormalize"
    dark = np.random.default_rng(0).random((100, 90)).astype(np.float32) ** 4  # mostly dark
    out = np.asarray(build_preprocessing(cfg)(dark)) * 0.25 + 0.5  # undo (x - 0.5) / 0.25
    plain = np.asarray(build_preprocessing(inference_config(len(NIH_LABELS), 32))(dark)) * 0.25 + 0.5
    # Spread over the range: much nearer mid-grey on average than the dark original.
    assert abs(float(out.mean()) - 0.5) < abs(float(plain.mean()) - 0.5) - 0.1


def test_a_coarse_bundle_fine_tunes_into_finer_maps_with_its_own_weights(tmp_path: Path) -> None:
    from monai_train.network import init_from_bundle, load_bundle_network

    export_untrained(
        tmp_path / "b", inference_config(len(NIH_LABELS), 64), seed=0, version="0", model_card="t"
    )
    net, cfg, shared = init_from_bundle(tmp_path / "b", NIH_LABELS, feature_stride=8)
    assert cfg["network_def"]["pool_free_transitions"] == [2, 3]
    assert isinstance(net, DenseNet121Fine) and shared == list(NIH_LABELS)
    source, _, _ = load_bundle_network(tmp_path / "b")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())
    with torch.inference_mode():
        assert net.features(torch.zeros(1, 1, 64, 64)).shape[2:] == (8, 8)
    kept, _, _ = init_from_bundle(tmp_path / "b", NIH_LABELS)  # no stride given: the source's
    assert not isinstance(kept, DenseNet121Fine)
