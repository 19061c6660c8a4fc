"""What needs the simulator: evaluation against the truth, benchmarks, training on simulated
data, simulated calibration sessions. Only the CLI and the tests import this package."""
