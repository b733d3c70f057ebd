"""Hook point names, and the ones the activation cache holds."""

from __future__ import annotations

from offline_pipeline.presets import Preset


def hook_name(layer: int, kind: str) -> str:
    return f"blocks.{layer}.hook_{kind}"


def collected_hooks(preset: Preset) -> list[str]:
    """Every hook point a later stage may read: the final layers under each candidate kind, and the sweep's."""
    hooks = {hook_name(layer, kind) for layer in preset.layers for kind in preset.hook_kinds()}
    if preset.sweep:
        hooks |= {hook_name(layer, kind) for layer in preset.sweep.layers for kind in preset.sweep.hook_kinds}
    return sorted(hooks)
