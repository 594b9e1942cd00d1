"""Crucible's standalone LoRA/QLoRA training worker (``python -m gpu.train``).

The worker imports nothing from the platform (Django); its only contract with it is
``gpu/PROTOCOL.md``: a job spec in, signed webhooks and files in the output location out.
"""

__version__ = "0.1.0"
WORKER_VERSION = __version__
