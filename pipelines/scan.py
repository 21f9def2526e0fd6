"""`trojan-gate scan MODEL.onnx --report R.json`: black-box DeepInspect scan of one model.

Writes the JSON report and a PNG grid of recovered triggers (one row per class: stamped
substitute images, then the trigger itself) beside it. Exit 0 clean, 1 trojan suspected,
2 error (unreadable model, bad held-out data, exhausted budget, ...).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from trojan_gate.gates.errors import TrojanGateError

from .cli import EXIT_ERROR, EXIT_FLAGGED, EXIT_OK

HELP = "scan an ONNX classifier for trojans with black-box DeepInspect"


def add_arguments(parser):
    parser.add_argument("model", help="path of the .onnx classifier")
    parser.add_argument("--report", required=True, help="where to write the JSON report (PNG grids go beside it)")
    parser.add_argument("--heldout", help="optional clean held-out data (.npz with x, y, or an image folder)")
    parser.add_argument("--heldout-mode", choices=("replace", "seed", "invert"), default="replace",
                        help="substitute set from the held-out data: replace (use its images), seed (invert "
                             "starting from them) or invert (inversion; held-out only trains the references)")
    parser.add_argument("--references", type=int, default=3,
                        help="benign reference models trained on the held-out data (0: the paper's plain test)")
    parser.add_argument("--transfer-factor", type=float, default=0.0,
                        help="with references: do not flag a class whose trigger moves the references more than "
                             "this many times as often as the median class's (0: report only; see README)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, help="maximum number of oracle queries")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--cutoff", type=float, help="deviation-factor cutoff c (default 2)")
    g.add_argument("--alpha", type=float, help="significance level; c = Phi^-1(1 - alpha/2)")
    parser.add_argument("--gradient", choices=("nes", "surrogate"), default="nes",
                        help="how the generator gets gradients: query estimates (nes) or a distilled surrogate")
    parser.add_argument("--generator-steps", type=int, help="override the generator's steps")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def save_trigger_grid(result, path, n_images: int = 4) -> Path:
    """One row per class: `n_images` stamped substitute images of other classes, then |trigger|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result.n_classes
    x, y = result.inverted_x, result.inverted_y
    cols = n_images + 1
    fig, axes = plt.subplots(k, cols, figsize=(1.2 * cols, 1.2 * k), squeeze=False)
    for t in range(k):
        src = x[y != t][:n_images]
        stamped = result.generator.stamp(src, t, seed=result.seed)
        panels = list(stamped) + [np.abs(result.trigger_samples[t, 0])]
        for j, ax in enumerate(axes[t]):
            img = panels[j] if j < len(panels) else np.zeros_like(panels[0])
            img = np.transpose(img, (1, 2, 0))
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        mark = " *" if t in result.flagged_classes else ""
        axes[t, 0].set_ylabel(f"{t}{mark}\ndf {result.deviation_factors[t]:.2f}", fontsize=7)
    axes[0, -1].set_title("|trigger|", fontsize=7)
    fig.suptitle(f"{result.verdict}: flagged {result.flagged_classes}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args) -> int:
    from trojan_gate.gates.data import load_heldout
    from trojan_gate.gates.oracle import ModelOracle
    from trojan_gate.gates.scan import scan
    from trojan_gate.gates.validation import validate_heldout

    try:
        oracle = ModelOracle(args.model)
        heldout = None
        if args.heldout:
            heldout = load_heldout(args.heldout, oracle.input_shape)
            validate_heldout(heldout.x, heldout.y, oracle.input_shape, oracle.n_classes)  # raises on failure
        overrides = {"gradient": args.gradient, "heldout_mode": args.heldout_mode,
                     "reference_models": args.references, "transfer_factor": args.transfer_factor}
        if args.generator_steps:
            overrides["generator_steps"] = args.generator_steps
        result = scan(oracle, heldout=heldout, seed=args.seed, budget=args.budget, cutoff=args.cutoff,
                      alpha=args.alpha, progress=not args.no_progress, **overrides)
    except (TrojanGateError, FileNotFoundError, KeyError) as e:
        print(f"trojan-gate scan: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    report = result.to_json(args.report)
    grid = save_trigger_grid(result, report.with_name(report.stem + "_triggers.png"))
    print(f"{result.verdict}: flagged classes {result.flagged_classes}, max deviation factor "
          f"{result.max_deviation_factor:.2f} (cutoff {result.cutoff:.3g}), {result.queries} queries, "
          f"{result.seconds:.1f} s")
    if result.transferable_classes:
        print(f"not flagged, past the cutoff but transferable to the references: {result.transferable_classes}")
    print(f"report: {report}\ntriggers: {grid}")
    return EXIT_FLAGGED if result.trojan_suspected else EXIT_OK
