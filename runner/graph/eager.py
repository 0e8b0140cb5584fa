"""No graphs: every decode step runs the model directly (CPU, debugging)."""
from __future__ import annotations

from typing import Any, Callable

from runner.step_inputs import DecodeBuffers, StepInputs


class EagerGraph:
    def capture(self, step_fn: Callable[[StepInputs], Any], buffers: DecodeBuffers,
                length_buckets: tuple[int, ...] = ()) -> None:
        self._step_fn = step_fn

    def padded_size(self, num_reqs: int) -> int:
        return num_reqs

    def replay(self, inputs: StepInputs) -> Any:
        return self._step_fn(inputs)

    def release(self) -> None:
        pass

    def describe(self) -> str:
        return "eager"
