"""Everything cag decides about one transformers model, in one object the torch engine owns.

Why one object: which fast decoding steps agreed with transformers on this model (verdicts), the fused
packed projections, the C step's description of the model (its plan) and how many rows torch may compute
in one call are facts about a loaded model. Keeping them here, rather than as attributes hung on the
transformers module or on the buffers answers decode in, gives them one owner and one lifetime: a model
loaded twice is checked twice, and nothing outlives the engine that made it.
"""

from __future__ import annotations

import threading

import torch

from ..cores import Cores
from ..base import StepCosts

UNDECIDED = object()  # a fact not worked out yet (None is a valid answer for some: "no plan")


class ModelState:
    """A transformers causal LM and cag's per-model decisions about it (filled in on first use)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self.layers: int = model.config.num_hidden_layers
        self.lock = threading.Lock()  # deciding a verdict or building a plan happens once, under it
        self.fast_ok: bool | None = None  # whether the lean/C steps can reproduce this architecture at all
        self.verdicts: dict[str, bool] = {}  # "native"/"lean" -> matched transformers on the first step
        self.fusions: list | None = None  # per layer: fused packed q/k/v and gate/up projections
        self.native_plan: object = UNDECIDED  # cag.engines.torch.nativestep.Plan, or None: the C step can't run it
        self.rows_together: int | None = None  # rows torch may compute in one call with each row's bits as alone
        self.step_costs = StepCosts()  # what its steps take by size: decoders come and go, the model stays
        self.cores: Cores | None = None  # set: the thread count was not given, each step takes the idle cores

    def threads_now(self) -> None:
        """Take as many threads as other work leaves cores idle (cag.engines.cores), when the user set none."""
        if self.cores is not None:
            n = self.cores.threads()
            if n != torch.get_num_threads():
                torch.set_num_threads(n)

    @property
    def config(self):
        return self.model.config
