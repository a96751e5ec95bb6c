"""Method qlora (Dettmers et al. 2023): the frozen base quantized to 4 bits by bitsandbytes as it loads (NF4 or FP4,
optionally with double quantization), LoRA adapters and the QA head on top in fp32.

The base is quantized by `load_backbone` (the method tells the loader: `load_kwargs`), the adapters are the `lora`
method's own (spanflow.models.modeling._lora). The QA head stays a plain fp32 Linear: transformers 5 keeps the module
of a model's last parameter out of 4 bits by default, but derives its name from `qa_outputs.bias`, which names no
module, so the head is named here. For export the base is dequantized and the adapters merged into it
(`merged_fp32_model`): the saved model is a plain fp32 Hugging Face model, so evaluation, the ONNX export and the
registered pyfunc take it as they take any other.

bitsandbytes is imported lazily: only a qlora run pays its import.
"""

from __future__ import annotations

import copy
import logging
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from spanflow.config import QloraConfig

QA_HEAD = "qa_outputs"
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
# (logger, what its message holds): the notes logged when bitsandbytes' CPU backend tries to fetch an optional kernel
_HUB_KERNEL_NOTES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{_HUB_KERNEL}'"),  # offline mode
)


class _DropHubKernelNote(logging.Filter):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


def quiet_hub_kernel_note() -> None:
    """Drop the warnings logged when bitsandbytes, at import on a CPU with avx512-bf16, tries to fetch an optional
    faster 4-bit GEMM (`kernels-community/quantization-bitsandbytes`) from the Hugging Face Hub through the `kernels`
    package, and cannot (no Hub, or an untrusted publisher): bitsandbytes' own native CPU kernel serves instead, and
    nothing is wrong. PEFT imports bitsandbytes whenever it is installed, so without this every LoRA run would print
    them. Other messages of these loggers pass."""
    for name, marker in _HUB_KERNEL_NOTES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHubKernelNote) for f in logger.filters):
            logger.addFilter(_DropHubKernelNote(marker))


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, or an error that says what method.name qlora needs."""
    quiet_hub_kernel_note()
    try:
        import bitsandbytes
    except Exception as exc:  # missing, or its native library fails to load
        raise RuntimeError(
            f"method.name qlora needs bitsandbytes (pip install 'bitsandbytes>=0.50'), which fails to import "
            f"({type(exc).__name__}: {exc}); install it or use method.name lora"
        ) from exc
    return bitsandbytes


def check_device(device: torch.device, quant_type: str) -> None:
    """Quantize and dequantize a small matrix on `device`: a clear error where bitsandbytes cannot run there."""
    bnb = import_bitsandbytes()
    cannot = f"method.name qlora: bitsandbytes {bnb.__version__} cannot run 4-bit {quant_type} on device {device}"
    what_to_do = "run on a CPU or a CUDA GPU, or use method.name lora"
    try:
        weight = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
        packed, state = bnb.functional.quantize_4bit(weight, quant_type=quant_type)
        error = (bnb.functional.dequantize_4bit(packed, state).float() - weight).abs().max().item()
    except Exception as exc:
        raise RuntimeError(f"{cannot} ({type(exc).__name__}: {exc}); {what_to_do}") from exc
    if not error < 0.2:  # 4 bits over [-1, 1]: steps of at most ~0.3, so a round trip is off by less than 0.2
        raise RuntimeError(f"{cannot} (a round trip is off by {error:.3g}); {what_to_do}")


def load_kwargs(cfg: QloraConfig, precision: str, device: torch.device) -> dict:
    """What `from_pretrained` needs to load the frozen base in 4 bits on `device`, computing in `precision`'s dtype
    (train.precision resolved: fp32 | bf16 | fp16); the QA head stays out of 4 bits."""
    check_device(device, cfg.quant_type)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[precision],
        llm_int8_skip_modules=[QA_HEAD],  # transformers 5's default list misses the head (module docstring)
    )
    return {"quantization_config": quantization, "device_map": {"": device}}


def linear4bit_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Name -> bitsandbytes Linear4bit, for every 4-bit Linear of `model`."""
    bnb = import_bitsandbytes()
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def ready_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """A freshly quantized backbone made safe to train: on a CPU with avx512-bf16, bitsandbytes repacks a Linear4bit's
    weight in place the first time it runs in eval mode without gradients (for a faster inference kernel), after
    which a training pass fails (`matmul_4bit` adds the bias in place to a view of a leaf) and the repacking itself
    needs in_features divisible by the block size (64). Training validates between epochs: keep the plain layout."""
    layers = linear4bit_modules(model)
    if not layers:
        raise ValueError(f"method qlora: {type(model).__name__} has no Linear to quantize to 4 bits")
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model a PEFT wrapper holds) was loaded with a bitsandbytes quantization config."""
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None


def quantized_numel(param: torch.Tensor) -> int:
    """The number of weights a parameter stands for: a 4-bit one packs two per byte (its own numel counts bytes)."""
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A Linear's weight in fp32: dequantized from 4 bits where it is a Linear4bit."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach().float()
    bnb = import_bitsandbytes()
    return bnb.functional.dequantize_4bit(weight.data, state).float()


def _plain_state(module: torch.nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """The state dict the plain model would have under `prefix`: 4-bit weights dequantized, LoRA merged into them,
    a PEFT modules_to_save wrapper replaced by its trained copy."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, LoraLayer):
        if module.merged:
            raise ValueError(f"{prefix}: LoRA already merged into a 4-bit weight; export from the unmerged model")
        base = module.get_base_layer()
        weight = _dense_weight(base)
        for name in module.active_adapters:
            if name in module.lora_A:
                weight += module.get_delta_weight(name).float()
        out[prefix + "weight"] = weight
        if base.bias is not None:
            out[prefix + "bias"] = base.bias.detach().float()
        return
    if isinstance(module, ModulesToSaveWrapper):
        names = [n for n in module.active_adapters if n in module.modules_to_save]
        trained = module.modules_to_save[names[0]] if names else module.original_module
        _plain_state(trained, prefix, out)
        return
    if getattr(getattr(module, "weight", None), "quant_state", None) is not None:  # a Linear4bit LoRA does not wrap
        out[prefix + "weight"] = _dense_weight(module)
        if module.bias is not None:
            out[prefix + "bias"] = module.bias.detach().float()
        return
    for name, param in module._parameters.items():
        if param is not None:
            out[prefix + name] = param.detach()
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = buffer.detach()
    for name, child in module.named_children():
        _plain_state(child, f"{prefix}{name}.", out)


def merged_fp32_model(model: torch.nn.Module) -> PreTrainedModel:
    """A plain fp32 model with the function of the 4-bit base + LoRA `model`: every 4-bit weight dequantized, the LoRA
    product added to it, the trained QA head in place; no quantization config. `model` is left as it is."""
    from transformers import AutoModelForQuestionAnswering

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state: dict[str, torch.Tensor] = {}
    _plain_state(base, "", state)
    config = copy.deepcopy(base.config)
    del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForQuestionAnswering.from_config(config, dtype=torch.float32)
    plain.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True)
    return plain.to(next(model.parameters()).device).eval()
