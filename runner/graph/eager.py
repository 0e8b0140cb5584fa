"""No graphs: every decode step runs the model directly (CPU, debugging)."""
from __future__ import annotations

from typing import Callable

import torch

from runner.step_inputs import DecodeBuffers, StepInputs


class EagerGraph:
    uses_static_max_len = False  # attention may use the batch's own length bound

    def capture(self, forward: Callable[[StepInputs], torch.Tensor],
                buffers: DecodeBuffers) -> None:
        self._forward = forward

    def padded_size(self, num_reqs: int) -> int:
        return num_reqs

    def replay(self, inputs: StepInputs) -> torch.Tensor:
        return self._forward(inputs)

    def release(self) -> None:
        pass

    def describe(self) -> str:
        return "eager"
