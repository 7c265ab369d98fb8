"""What every frontend produces: :class:`LoadedModel`, a step-contract module ready to capture, with
what the artifact records about it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

PARITY_SEED = 2  # LoadedModel.parity_prompt; the capture's example stream uses seed 1


@dataclass
class LoadedModel:
    """A model ready to capture: the step-contract module and what the artifact records about it."""

    name: str                 # for messages and effexport.json
    model: torch.nn.Module    # forward(input_ids, past=None) -> (logits, present: dict[str, Tensor])
    vocab_size: int
    sample: object | None     # the built-in Sample when there is one (report.json's analytic report), else None
    source: dict = field(default_factory=dict)  # {"kind": "sample"|"hf"|"pickle"|"module", ...} (effexport.json)
    example_length: int = 40  # capture's example stream: past every window / top-k (samples._spec.capture_length)
    context_limit: int | None = None  # the longest context the model was trained for, when its config says
    example_new_tokens: int = 3  # the capture's example step: the stream's last tokens (samples._spec.capture_new_tokens)
    weights: object | None = None  # a streamed build's WeightSource (frontends/streaming.py): meta parameters backed by it

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def structure_only(self) -> bool:
        """True when the weights have no data (meta device, no checkpoint behind them): no parity, no runtime."""
        return self.device.type == "meta" and self.weights is None

    def example_ids(self, batch: int = 2, length: int | None = None, seed: int = 1,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """The deterministic token stream used for capture and parity (on ``device``, default the
        model's); ``length`` defaults to :attr:`example_length`."""
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, length or self.example_length)
        return torch.randint(0, self.vocab_size, shape, generator=gen).to(device or self.device)

    def parity_prompt(self, length: int, batch: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
        """The prompt the parity check feeds eager and the artifact: drawn from its own seed, not a
        slice of the capture's :meth:`example_ids`, so a capture that baked the example's token
        values into the graph fails the check instead of replaying the stream it was traced on
        (``device="cpu"`` for a streamed model, whose parameters are on meta)."""
        return self.example_ids(batch, length, seed=PARITY_SEED, device=device)
