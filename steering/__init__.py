"""Steering writes to models: hooks, weight edits, checkpoints. Importing it registers "embedded-refuser"."""

from probes.models import register_model


def _load_refuser(**kwargs):
    from steering.organism import load_refuser

    return load_refuser(**kwargs)


register_model("embedded-refuser", _load_refuser)
