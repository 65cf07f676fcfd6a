"""Models: load a local image-text-to-text checkpoint, answer with scores, attach LoRA adapters."""
