"""The int8 recipe of `python -m training quantize-onnx` on a small convolutional graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from training import quantize


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 3)
        self.mask = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f.mean(dim=(2, 3))), self.mask(f)


def test_only_the_convolutions_are_quantised_and_the_answers_stay_close(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Small().eval()
    source, target = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    torch.onnx.export(
        model, (torch.zeros(1, 3, 32, 32),), str(source), input_names=["x"],
        output_names=["classes", "masks"], dynamo=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(16)]
    assert quantize.quantise(source, target, inputs, "conv") == []

    graph = onnx.load(str(target)).graph
    ops = [node.op_type for node in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # the class head (Gemm/MatMul) is not quantised: its weights stay fp32 initialisers
    quantised_inputs = {i for node in graph.node if node.op_type == "DequantizeLinear"
                        for i in node.input}  # fmt: skip
    head = [node for node in graph.node if node.op_type in ("Gemm", "MatMul")]
    assert head and not any(i in quantised_inputs for node in head for i in node.input[1:])

    fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    for a, b in zip(fp32.run(None, {"x": x}), int8.run(None, {"x": x}), strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 0.1 * (np.abs(a).max() + 1e-6) + 0.05
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 3  # every convolution's weights are stored as int8


def test_a_recipe_leaves_the_nodes_it_names_in_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    torch.onnx.export(
        Small().eval(), (torch.zeros(1, 3, 32, 32),), str(source), input_names=["x"],
        output_names=["classes", "masks"], dynamo=False,
    )  # fmt: skip
    inputs = [np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)]
    recipes = {**quantize.RECIPES, "stem": {**quantize.RECIPES["conv"], "fp32_nodes": "features.0"}}
    monkeypatch.setattr(quantize, "RECIPES", recipes)
    assert quantize.quantise(source, target, inputs, "stem") == ["/features/features.0/Conv"]
    graph = onnx.load(str(target)).graph
    first = next(node for node in graph.node if node.name == "/features/features.0/Conv")
    assert first.input[0] == "x"  # the input reaches the first convolution unrounded
    with pytest.raises(ValueError, match="matches"):
        recipes["missing"] = {**quantize.RECIPES["conv"], "fp32_nodes": "no-such-node"}
        quantize.quantise(source, tmp_path / "other.onnx", inputs, "missing")
