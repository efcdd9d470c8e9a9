"""`vanilla`: no pruning (the unpruned model, Table 1's first row)."""
from dataclasses import dataclass

from sharp.engine.method import PruningMethod


@dataclass
class Vanilla(PruningMethod):
    name = "vanilla"

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        return [n_visual] * num_layers
