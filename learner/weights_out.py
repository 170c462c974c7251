"""The learner's side of weight broadcast: a model's state dict, serialised once, published per version.

Decided here:
- The state dict goes out as safetensors bytes (format name "safetensors"), the format the actors'
  weight watcher decodes. Tied parameters (one tensor under two names, e.g. a tied lm_head) are
  sent once, under the name the checkpoint itself uses, so the bytes match a `save_pretrained`
  checkpoint's keys; everything is made contiguous and moved to the CPU first.
- `publish_every` decides which versions go out (1 = every update); the publisher keeps the newest
  two, and a slow or dead actor never blocks the learner (chunks are served from a background
  thread).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import save as save_safetensors

from common.config import TransportConfig
from common.weights import WeightPublisher
from common.wire import WeightsAnnounceMsg


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each storage once (tied weights keep their first name), on CPU and contiguous."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def serialise_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return save_safetensors(dict(tensors))


class WeightBroadcaster:
    def __init__(self, transport: TransportConfig, publish_every: int = 1, reannounce_s: float = 1.0) -> None:
        if publish_every < 1:
            raise ValueError("publish_every must be >= 1")
        self.publish_every = publish_every
        self.publisher = WeightPublisher(transport, reannounce_s=reannounce_s)

    def maybe_publish(self, model: torch.nn.Module, version: int) -> WeightsAnnounceMsg | None:
        """Publish `version` if it is due (every `publish_every` versions, and always version 0)."""
        if version % self.publish_every:
            return None
        return self.publish(model, version)

    def publish(self, model: torch.nn.Module, version: int) -> WeightsAnnounceMsg:
        """Publish `version` now, due or not (the learner's first version after a start or resume)."""
        return self.publisher.publish(version, serialise_state(unique_state_dict(model)))

    def close(self) -> None:
        self.publisher.close()

    def __enter__(self) -> WeightBroadcaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
