"""The device a flag names must exist: `--device cuda` on a machine without CUDA is a named error, not an
AssertionError from deep inside torch."""

from __future__ import annotations

from studio.errors import StudioError

DEVICES = ("cpu", "cuda", "auto")


def check_device(device: str) -> None:
    """Raise StudioError when `device` is unknown, or is cuda without a usable CUDA device."""
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise StudioError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch for CUDA {torch.version.cuda}"
            raise StudioError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                              f"{build}). Use --device cpu, or auto to use a GPU when there is one.")


def resolve_device(device: str) -> str:
    """The one device a pass runs on: auto is the GPU when torch has one, else the CPU."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
