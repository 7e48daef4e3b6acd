"""Triton kernels for minbert, each beside a plain-torch reference (installed as ``minbert.kernels``).

Public functionals are loaded lazily, so ``import minbert.kernels`` does not import Triton
until a kernel is first used. Dispatch (see ``_dispatch.py``): a CUDA tensor runs the Triton
kernel; a CPU tensor runs it through Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before import; otherwise the torch reference runs. ``MINBERT_KERNEL_BACKEND=reference`` or
``=triton`` forces either path.
"""
import importlib

_EXPORTS = {
    # attention.py
    "attention": "attention",
    "attention_reference": "attention",
    "attention_dropout_mask": "attention",
    # lora.py
    "lora_linear": "lora",
    "lora_linear_reference": "lora",
    # smart.py
    "smart_perturb_step": "smart",
    "smart_perturb_step_reference": "smart",
    "symmetric_kl": "smart",
    "symmetric_kl_reference": "smart",
    "smart_noise": "smart",
    "smart_noise_reference": "smart",
    "binary_to_two_class_logits": "smart",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minbert.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
