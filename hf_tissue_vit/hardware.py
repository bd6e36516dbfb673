"""What the machine offers and the speed settings that follow from it: CPU model and bf16 support,
DataLoader workers, mixed precision and the attention implementation for training and inference.

The defaults follow measurements on the project's CPUs and GPUs, listed with machine, date and
command in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def cpu_info() -> dict[str, Any]:
    """CPU model name and the instruction-set flags that matter for bf16/AMX speed (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"model": model, "flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags]}


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    return bool(set(cpu_info()["flags"]) & {"amx_bf16", "avx512_bf16"})


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bf16 autocast is fast and supported on ``device``: CUDA asks torch, CPU needs native
    bf16 instructions (:func:`cpu_supports_bf16`; without them bf16 is emulated and slower)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        return cpu_supports_bf16()
    return False


def has_accelerator() -> bool:
    """Whether torch sees any accelerator (CUDA, MPS, XPU, ...); without one, training runs on the CPU."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def default_training_bf16(use_cpu: bool = False) -> bool:
    """bf16 mixed precision for training by default: on a CUDA GPU that supports it, or, when training
    on the CPU (``use_cpu`` or no accelerator), when the CPU has native bf16 (faster there; benchmarks/RESULTS.md).
    Other accelerators (MPS, XPU, ...) stay in fp32 unless asked."""
    if not use_cpu and torch.cuda.is_available():
        return bf16_supported("cuda")
    if not use_cpu and has_accelerator():
        return False
    return cpu_supports_bf16()


def cpu_has_amx() -> bool:
    """True when the CPU has AMX-BF16 tile instructions (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in cpu_info()["flags"]


def default_attn_implementation(device: str | torch.device, bf16: bool, training: bool = True) -> str:
    """The attention kernel that measured faster for this use (benchmarks/RESULTS.md, section 5):
    ``"eager"`` on a CPU with bf16 autocast (for inference only where the CPU lacks AMX), else ``"sdpa"``.
    """
    if torch.device(device).type != "cpu" or not bf16:
        return "sdpa"
    return "eager" if training or not cpu_has_amx() else "sdpa"


def resolve_attn_implementation(requested: str, device: str | torch.device, bf16: bool, training: bool = True) -> str:
    """``requested`` (one of :data:`ATTN_IMPLEMENTATIONS`), with ``"auto"`` resolved by
    :func:`default_attn_implementation`."""
    check_attn_implementation(requested)
    return default_attn_implementation(device, bf16, training) if requested == "auto" else requested


def check_attn_implementation(value: str, flag: str = "--attn_implementation") -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`ATTN_IMPLEMENTATIONS`."""
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{flag} must be one of {list(ATTN_IMPLEMENTATIONS)}, got {value!r}")


def default_device_augmentation(device: str | torch.device) -> bool:
    """Augment training batches on the device (``--device_augmentation``) by default when it is a CUDA GPU: one
    CPU core per GPU cannot augment the thousands of images/s a GPU trains on; on the CPU it gains nothing."""
    return torch.device(device).type == "cuda"


def resolve_device_augmentation(requested: bool | None, device: str | torch.device) -> bool:
    """``--device_augmentation`` (None = :func:`default_device_augmentation` of the training device)."""
    return default_device_augmentation(device) if requested is None else bool(requested)


def parse_bf16_flag(value: str | bool | None, flag: str = "--bf16") -> bool | None:
    """``auto``/None -> None (decide by hardware), true/false (also yes/no/1/0/on/off) -> bool."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{flag} must be auto, true or false, got {value!r}")


def auto_num_workers() -> int:
    """Default DataLoader workers for training: min(4, cpus - 1)."""
    # One core stays with the training process; the augmentation is batched, so few workers suffice.
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def hardware_info(training_args: Any) -> dict[str, Any]:
    """Device, CPU model, GPU name, process count, threads and mixed precision of a training run
    (``TrainingArguments``), for all_results.json and the model card."""
    info: dict[str, Any] = {
        "device": str(training_args.device.type),
        "num_processes": training_args.world_size,
        "cpu": cpu_info()["model"],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": "bf16" if training_args.bf16 else ("fp16" if training_args.fp16 else "no"),
    }
    if training_args.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(training_args.device)
    return info


def versions() -> dict[str, str]:
    """Versions of the packages that shape results (for all_results.json, cards and benchmarks)."""
    import accelerate
    import datasets
    import transformers

    from . import __version__

    return {
        "hf_tissue_vit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, load, platform and :func:`versions`: what a reader needs to judge a number."""
    info = cpu_info()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": info["model"],
        "cpu_flags": info["flags"],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1_5_15": [round(v, 2) for v in load] if load else None,
        "platform": platform.platform(),
        **versions(),
    }
