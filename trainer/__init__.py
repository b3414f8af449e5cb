"""Atelier's training engine (never imports gradio)."""
from trainer.quiet import silence_library_noise

# Before any library of ours is imported, so that their import-time noise is filtered too.
silence_library_noise()
