"""Steering processors: the methods, their interface and the batched stack.

Importing this package registers every processor that ships with this build.
This package never imports ``server`` (the web layer) — see DESIGN.md.
"""

from processors import (  # noqa: F401  (registers the processors)
    calibration,
    control,
    fusion,
    guard,
    logit_bias,
    ngram,
)
from processors.base import ParamError, Processor, ProcessorEnv, StepContext
from processors.stack import ProcessorStack, StackEntry, parse_stack, registered_types

__all__ = [
    "ParamError",
    "Processor",
    "ProcessorEnv",
    "ProcessorStack",
    "StackEntry",
    "StepContext",
    "parse_stack",
    "registered_types",
]
