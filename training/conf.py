"""Training settings, read from django.conf.settings with these defaults.

BILLING_RUNPOD_GPU_TYPE   h100-pcie-80gb   the GPU type of RunPod jobs that name none (the
                                           setting keeps its name: billing prices these jobs
                                           at the same type, through runpod_gpu_type())
"""

from __future__ import annotations

from django.conf import settings

DEFAULT_RUNPOD_GPU_TYPE = "h100-pcie-80gb"


def runpod_gpu_type() -> str:
    return getattr(settings, "BILLING_RUNPOD_GPU_TYPE", DEFAULT_RUNPOD_GPU_TYPE)
