"""Thin Ray job entrypoints: ``python jobs/<name>.py --config ...`` or ``ray job submit -- python jobs/<name>.py``."""
