"""The kernel suites time with the same code as the model benchmark."""

from resnet_fast.bench.timing import interleaved, median_ratio, time_once  # noqa: F401
