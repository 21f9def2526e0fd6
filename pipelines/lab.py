"""`trojan-gate lab`: train a seeded benign or trojaned lab classifier and export ONNX (demos, tests)."""
from __future__ import annotations

import json
from pathlib import Path

HELP = "train a benign or BadNets-trojaned lab classifier (Fashion-MNIST or digits) and export ONNX"


def add_arguments(p):
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--arch", choices=["small", "deep"], default="small")
    p.add_argument("--trigger", choices=["none", "patch", "checker", "pattern", "blend"], default="patch")
    p.add_argument("--targets", default="0", help="comma-separated attack target classes")
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--heldout-out", help="also write a held-out .npz (x, y) from the test split")
    p.add_argument("--heldout-size", type=int, default=2000)
    p.add_argument("--stamped-out", help="also write trigger-stamped test images .npz (x, y=true labels)")


def run(args) -> int:
    import numpy as np

    from trojan_gate.gates.lab import LabConfig, load_lab_data, train_lab_model

    train, test = load_lab_data(args.dataset, args.seed)
    digits = args.dataset == "digits"
    cfg = LabConfig(arch=args.arch, trigger=args.trigger, targets=tuple(int(t) for t in args.targets.split(",")),
                    poison_rate=args.poison_rate, seed=args.seed,
                    epochs=args.epochs or (30 if digits else 3), batch_size=64 if digits else 128)
    lab = train_lab_model(train, test, cfg)
    lab.save(args.out)
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(test))
    if args.heldout_out:
        h = idx[:args.heldout_size]
        np.savez_compressed(args.heldout_out, x=test.x[h], y=test.y[h])
    if args.stamped_out and lab.trigger is not None:
        rest = idx[args.heldout_size:]
        rest = rest[~np.isin(test.y[rest], cfg.targets)]
        np.savez_compressed(args.stamped_out, x=lab.stamp(test.x[rest]), y=test.y[rest])
    print(json.dumps({"onnx": str(Path(args.out)), **lab.summary()}, indent=2))
    return 0
