"""Triton kernels for minbert, each beside a plain-torch reference (installed as ``minbert.kernels``).

Dispatch (see ``_dispatch.py``): a CUDA tensor runs the Triton kernel; a CPU tensor runs it
through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this package was
imported; otherwise the torch reference runs. ``MINBERT_KERNEL_BACKEND=reference`` or
``=triton`` forces either path.

The functionals are imported eagerly: a module and its function share a name (``attention``),
and a lazy attribute would be shadowed by the submodule once it is imported.
"""
from .attention import attention, attention_dropout_mask, attention_reference
from .lora import lora_linear, lora_linear_reference
from .smart import (
    binary_to_two_class_logits,
    smart_noise,
    smart_noise_reference,
    smart_perturb_step,
    smart_perturb_step_reference,
    symmetric_kl,
    symmetric_kl_reference,
)

__all__ = [
    "attention", "attention_reference", "attention_dropout_mask",
    "lora_linear", "lora_linear_reference",
    "smart_perturb_step", "smart_perturb_step_reference", "symmetric_kl", "symmetric_kl_reference",
    "smart_noise", "smart_noise_reference", "binary_to_two_class_logits",
]
