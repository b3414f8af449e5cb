"""Automatic captions (Florence-2, BLIP) and bulk caption edits for a dataset folder."""
