"""bitsandbytes quantized base layers (4-bit NF4/FP4 and 8-bit) for every peft-core method."""

from peft_bnb.backend import BNB_4BIT, BNB_8BIT, quantize_4bit, quantize_8bit

__all__ = ["BNB_4BIT", "BNB_8BIT", "quantize_4bit", "quantize_8bit"]
