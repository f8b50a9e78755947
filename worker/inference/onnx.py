"""ONNX Runtime for the CPU path: the bundle's network plus its class-activation maps as one graph.

The graph is exported from the bundle's own weights (``models/model.onnx`` beside the safetensors) and
checked against torch in the tests, so both backends give the same probabilities and maps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.inference.bundle import ONNX_WEIGHTS as ONNX
from worker.inference.cam import CamNetwork


def export_onnx(bundle_dir: Path) -> Path:
    """Write ``models/model.onnx`` from the bundle's own (possibly fp16-stored) weights, in fp32."""
    from worker.inference.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    image_size = int(bundle.parser.get_parsed_content("image_size"))
    target = bundle_dir / ONNX
    model = CamNetwork(bundle.network())
    example = torch.zeros(1, 1, image_size, image_size)
    torch.onnx.export(
        model,
        (example,),
        str(target),
        input_names=["image"],
        output_names=["logits", "cams"],
        dynamic_axes={
            "image": {0: "n", 2: "h", 3: "w"},
            "logits": {0: "n"},
            "cams": {0: "n", 2: "fh", 3: "fw"},
        },
        opset_version=17,
        dynamo=False,
    )
    return target
