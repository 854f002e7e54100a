"""LoRA adapters registered for the whole cluster at run time, and loading them onto workers."""
