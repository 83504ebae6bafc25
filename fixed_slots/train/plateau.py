"""The official SLATE learning-rate decay: halve both rates when the validation loss stalls.

singhgautam/slate `train.py`, once per epoch: the validation loss (dVAE MSE + cross-entropy,
model in eval mode, averaged over the validation batches) counts as an improvement only when it
is strictly lower than the best so far; otherwise a stagnation counter goes up, and when it
reaches `patience` (4) both learning rates are multiplied by 0.5 and the counter restarts. It is
its own counter, not torch's ReduceLROnPlateau (no threshold, no cooldown).

`ValidationPlateau` is that rule on the host; its multiplier goes into the train state's
`lr_scale` (config.optim.decay = "validation_plateau"), and its counters are saved with every
checkpoint so a resumed run continues the same schedule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class ValidationPlateau:
    patience: int = 4
    factor: float = 0.5
    best: float = math.inf
    stagnation: int = 0
    scale: float = 1.0
    evaluations: int = 0

    def update(self, validation_loss: float) -> bool:
        """Records one validation loss; returns whether the rates were just decayed."""
        self.evaluations += 1
        if validation_loss < self.best:
            self.best = float(validation_loss)
            self.stagnation = 0
            return False
        self.stagnation += 1
        if self.stagnation >= self.patience:
            self.scale *= self.factor
            self.stagnation = 0
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinity: the best of no evaluation is stored as None.
        record = dataclasses.asdict(self)
        record["best"] = None if math.isinf(self.best) else self.best
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any], patience: int, factor: float
                  ) -> "ValidationPlateau":
        """The saved counters, with the config's patience and factor (the rule may change)."""
        best = record.get("best")
        return cls(patience=patience, factor=factor,
                   best=math.inf if best is None else float(best),
                   stagnation=int(record.get("stagnation", 0)),
                   scale=float(record.get("scale", 1.0)),
                   evaluations=int(record.get("evaluations", 0)))
