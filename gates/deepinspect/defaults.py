"""The scan's generator defaults, defined once: `ScanConfig`, `GeneratorTrainer` and
`trigger_statistics` read them from here, so a trainer built alone behaves like the scan's."""

GENERATOR_STEPS = 300  # steps of G (Eq. 3-6) per scan
GAMMA2 = 0.1  # starting weight of the hinge (size) term, adapted per class
SUCCESS_TARGET = 0.99  # attack success a recovered trigger must reach (the paper asks for >= 0.95)
