"""Weight quantisation after the low-rank step (the ``quant`` extra), through torchao.

Why torchao: it is PyTorch's own maintained quantisation library, its int8 weight-only tensors
run on the CPU (and on GPUs) inside the ordinary ``F.linear``/``F.embedding`` calls, so every
compressed module kind keeps working unchanged — including ``LowRankLinear``'s two factors and
the rank slices of progressive decoding — and it flattens its tensors to plain safetensors
(no pickle). optimum-quanto only swaps ``nn.Linear`` modules (our factors are parameters of
one module) and is in maintenance mode; llm-compressor/compressed-tensors target GPU serving
stacks and ``nn.Linear`` too.

``int8``: every 2-D weight of the decoder layers (dense and resized linears, both low-rank
factors, head-wise PCA's value/output projections) and the token embedding (shared with a tied
``lm_head``) becomes int8 with one float scale per output row (symmetric); norms, biases and
an untied ``lm_head`` stay as they are.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXTRA = "weight quantisation needs torchao: pip install 'lowrank-kit[quant]'"
METHODS = ("int8",)


class _DropKnownNoise(logging.Filter):
    """torchao's CPU wheels log a warning per CUDA-only kernel library they cannot load, and torch
    one per enum torchao registers, every time transformers imports torchao: noise on every run."""

    PATTERNS = ("Failed to load", "is an Enum subclass and is now natively supported")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(pattern in str(record.msg) for pattern in self.PATTERNS)


def silence_import_noise() -> None:
    """Install the filter (before transformers imports torchao, so at ``import lowrank_kit``)."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())


silence_import_noise()  # at import: ``lowrank_kit/__init__`` imports this module before transformers


def available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def _int8(weight: torch.Tensor) -> nn.Parameter:
    from torchao.quantization import Int8Tensor, PerRow

    return nn.Parameter(Int8Tensor.from_hp(weight.detach(), granularity=PerRow()), requires_grad=False)


def is_quantized(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "Int8Tensor"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantised) tensor holds."""
    if is_quantized(tensor):
        return sum(getattr(tensor, name).nbytes for name in tensor.tensor_data_names
                   + [n for n in getattr(tensor, "optional_tensor_data_names", []) if getattr(tensor, n) is not None])
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(p) for p in model.parameters())  # tied tensors once


def quantize(model: Any, layers: nn.ModuleList, method: str = "int8") -> dict[str, Any]:
    """Quantise ``model``'s decoder-layer weights and its embedding in place; what was done, in numbers."""
    if method not in METHODS:
        raise ValueError(f"unknown quantisation {method!r}; known: {', '.join(METHODS)}")
    if not available():
        raise ImportError(EXTRA)
    before = parameter_bytes(model)
    count = 0
    for layer in layers:
        for module in layer.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dim() == 2 and param.numel() and not is_quantized(param):  # a rank-0 factor stays
                    setattr(module, name, _int8(param))
                    count += 1
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    embedding.weight = _int8(embedding.weight)
    count += 1
    if tied:
        head.weight = embedding.weight
    import torchao

    return {"method": method, "library": f"torchao {torchao.__version__}", "tensors": count,
            "parameter_bytes": {"before": before, "after": parameter_bytes(model)}}


def has_quantized(model: nn.Module) -> bool:
    return any(is_quantized(p) for p in model.parameters())


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor (lm_head = embedding) once; ``tie_weights`` restores it."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        # state_dict() wraps a tied quantised tensor anew under each name: compare its storage
        data = tensor.qdata if is_quantized(tensor) else tensor
        key = (data.data_ptr(), tuple(tensor.shape), data.dtype)
        if key not in seen:
            seen.add(key)
            state[name] = tensor if is_quantized(tensor) else tensor.contiguous()
    return state


def save(model: nn.Module, path: Path) -> None:
    """The state dict with quantised tensors flattened to plain ones (torchao's safetensors layout)."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    data, metadata = flatten_tensor_state_dict(_unique_state(model))
    save_file({k: v.contiguous() for k, v in data.items()}, str(path),
              metadata={**{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
                        "format": "pt"})


def load(model: nn.Module, path: Path) -> None:
    """Fill a freshly built (compressed, unquantised) model from a file ``save`` wrote; strict."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        data = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
    metadata.pop("format", None)
    tensors, leftover = unflatten_tensor_state_dict(data, metadata)
    if leftover:
        raise ValueError(f"'{path}' holds tensors no weight claims: {sorted(leftover)[:3]}")
    wanted = _unique_state(model)
    missing = [name for name in wanted if name not in tensors]
    unexpected = [name for name in tensors if name not in wanted]
    if missing or unexpected:
        raise ValueError(f"weights in '{path}' do not match the rebuilt model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
    model.tie_weights()
