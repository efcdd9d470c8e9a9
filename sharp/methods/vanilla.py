"""`vanilla`: no pruning (the unpruned model, Table 1's first row)."""
from dataclasses import dataclass

from sharp.engine.method import PruningMethod


@dataclass
class Vanilla(PruningMethod):
    name = "vanilla"

    def __post_init__(self):
        super().__post_init__()
        if self.retention != 1.0:
            raise ValueError(f"retention={self.retention} with method 'vanilla'; accepted values: 1 "
                             "(vanilla keeps every visual token)")

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        return [n_visual] * num_layers
