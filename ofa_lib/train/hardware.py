"""Where and in what precision a run trains: the device (never a silent CPU fallback) and the precision the
hardware runs natively (``precision: auto``), each refused with a message naming the node and torch build."""

from __future__ import annotations

import platform
from typing import Any

import torch

from ofa_lib.train.config import PRECISIONS, TrainConfig

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """The asked-for device or precision is not available here; the message names the node and torch build."""


def torch_build() -> str:
    """``torch 2.13.0+cpu (CUDA none)`` / ``torch 2.13.0+cu128 (CUDA 12.8, archs sm_80 …)``: what this torch can run on."""
    cuda = torch.version.cuda
    archs = ""
    if cuda:
        try:
            archs = ", kernels for " + " ".join(torch.cuda.get_arch_list())
        except Exception:  # noqa: BLE001 -- a broken driver must not hide the build in the message
            archs = ""
    return f"torch {torch.__version__} (CUDA {cuda or 'none'}{archs})"


def resolve_device(device: str | None, preset: str = "cpu") -> torch.device:
    """The device a run trains on, never a silent fallback.

    ``None``/``"auto"`` is ``cuda`` for the ``paper`` preset (xlm-roberta-large on a CPU takes days: a GPU job
    on a node without a working CUDA build must fail, not crawl) and otherwise ``cuda`` when available, else
    ``cpu``. An explicit ``cuda`` (or ``cuda:N``) without a usable CUDA device raises :class:`DeviceError`
    naming the node and the torch build; so does an unknown device string.
    """
    name = "cuda" if (device in (None, "auto") and preset == "paper") else device
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"parameter device={device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({exc})") from None
    if dev.type == "cuda":
        where = f"on node {platform.node()} with {torch_build()}"
        if not torch.cuda.is_available():
            why = ("this torch has no CUDA support: install a CUDA wheel (README: 'Torch on GPUs')" if not torch.version.cuda
                   else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES or the job's --gres)")
            asked = f"device={device!r}" if device not in (None, "auto") else f"preset {preset!r} (device auto means cuda)"
            raise DeviceError(f"{asked} needs CUDA, but torch.cuda.is_available() is False {where}: {why}; "
                              "pass device='cpu' to train on the CPU on purpose")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) {where}")
        cc = torch.cuda.get_device_capability(dev)
        if not cuda_arch_supported(cc, torch.cuda.get_arch_list()):
            raise DeviceError(f"device={device!r}: {torch.cuda.get_device_name(dev)} is sm_{cc[0]}{cc[1]}, and {torch_build()} "
                              f"has no kernels for it {where}; install a wheel built for it (README: 'Torch on GPUs')")
    elif dev.type != "cpu":
        raise DeviceError(f"parameter device={device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def cuda_arch_supported(cc: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with kernels for ``arch_list`` (``["sm_80", "sm_90", "compute_90"]``) runs on a GPU of
    compute capability ``cc``: a binary for the same major and a minor ≤ the GPU's, or PTX (``compute_XY``) for an
    older-or-equal architecture that the driver compiles. A GPU older than every build target is not supported."""
    have = cc[0] * 10 + cc[1]
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        n = int(num)
        if kind == "sm" and n // 10 == cc[0] and n <= have:
            return True
        if kind == "compute" and n <= have:
            return True
    return False


def cpu_precision_support() -> dict[str, Any]:
    """What this CPU offers for reduced precision: torch's kernel capability, AVX512-BF16, AMX (bf16 tiles,
    fp16 tiles), and whether oneDNN runs bf16 at all (it emulates it with AVX512 core)."""
    def probe(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        try:
            return bool(fn()) if fn else False
        except Exception:  # noqa: BLE001 -- a probe that cannot run means "not supported"
            return False

    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        mkldnn_bf16 = False
    return {"capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": probe("_is_avx512_bf16_supported"),
            "amx_tile": probe("_is_amx_tile_supported"), "amx_fp16": probe("_is_amx_fp16_supported"),
            "mkldnn_bf16": mkldnn_bf16}


def resolve_precision(requested: str, device: torch.device, optimizer: str = "adamw") -> tuple[str, str]:
    """The precision a run uses on ``device`` → ``(precision, why)``.

    ``auto``: bf16 on CUDA devices of compute capability ≥ 8.0 and on CPUs with native bf16 (AVX512-BF16 or
    AMX); fp16 with a GradScaler on older CUDA devices (fp32 for SAM and the Fisher penalty, whose extra
    gradients the scaler does not cover); else fp32. An explicit ``bf16``/``fp16`` the hardware does not run
    natively raises :class:`DeviceError` (emulated half precision is slower than fp32, not faster).
    """
    if requested not in PRECISIONS:
        raise DeviceError(f"parameter precision={requested!r} is invalid: expected one of {PRECISIONS}")
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]})"
        bf16 = cc >= (8, 0)
        fp16 = True
        hw = gpu
    else:
        support = cpu_precision_support()
        bf16 = support["avx512_bf16"] or support["amx_tile"]
        fp16 = support["amx_fp16"]
        hw = (f"CPU {support['capability']}, AVX512-BF16 {'yes' if support['avx512_bf16'] else 'no'}, "
              f"AMX {'yes' if support['amx_tile'] else 'no'}")
    if requested == "auto":
        if bf16:
            return "bf16", f"auto: {hw} has native bf16"
        if device.type == "cuda":
            if optimizer != "adamw":
                return "fp32", f"auto: {hw} has no bf16, and fp16's GradScaler does not cover optimizer={optimizer!r}"
            return "fp16", f"auto: {hw} has no bf16: fp16 autocast with a GradScaler"
        return "fp32", f"auto: {hw} has no native bf16"
    if requested == "bf16" and not bf16:
        raise DeviceError(f"precision='bf16' on {hw} on node {platform.node()}: no native bf16 here (it would be "
                          "emulated, slower than fp32); use precision='auto' or 'fp32'" +
                          ("" if device.type == "cpu" else " or 'fp16'"))
    if requested == "fp16":
        if not fp16:
            raise DeviceError(f"precision='fp16' on {hw} on node {platform.node()}: no native fp16 here; "
                              "use precision='auto' or 'fp32'")
        if optimizer != "adamw":
            raise DeviceError(f"precision='fp16' trains with a GradScaler, which covers optimizer='adamw' only, "
                              f"not optimizer={optimizer!r}; use precision='bf16' (compute capability ≥ 8.0) or 'fp32'")
    return requested, f"{requested} as asked, on {hw}"


def resolve_runtime(cfg: TrainConfig, device: str | None = None) -> tuple[torch.device, str, str]:
    """``(device, precision, why)`` for a run here: :func:`resolve_device` then :func:`resolve_precision`.
    Called by 02_train's first cell, so a run that cannot get what it asks for fails before any work."""
    dev = resolve_device(device, cfg.preset)
    precision, why = resolve_precision(cfg.precision, dev, cfg.optimizer)
    return dev, precision, why
