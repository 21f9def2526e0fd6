"""Small helpers the tests share (kept out of the package: users call the public API directly)."""
from trojan_gate.gates import DeepInspect


def scan(model, heldout=None, seed=0, budget=None, cutoff=None, alpha=None, progress=False, **options):
    """One DeepInspect scan through the public API, without progress bars."""
    return DeepInspect(cutoff=cutoff, alpha=alpha, seed=seed, budget=budget, progress=progress,
                       **options).scan(model, heldout=heldout)


def leftover_scratch(folder) -> list:
    """The project's temporary folders (`trojan-*`) still under `folder`, by name."""
    from pathlib import Path

    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("trojan-"))
