"""TOY: the smallest delta-merging method, registered through the real entry-point path."""

from peft_toy.config import ToyConfig
from peft_toy.layer import ToyLayer

__all__ = ["ToyConfig", "ToyLayer"]
