"""Round-to-nearest (RTN) weight quantization: min/max scales per group or channel.

Config keys: ``quant.weight`` (bit, symmetric, granularity, group_size); no
``quant.special`` keys. The baseline every other algorithm must beat.
"""
from __future__ import annotations

from llmc.algorithms.base import Algorithm, register_algorithm
from llmc.context import BlockContext


@register_algorithm
class RTN(Algorithm):
    name = "RTN"
    aliases = ("round_to_nearest",)
    needs_calib = False

    def process_block(self, ctx: BlockContext) -> None:
        for name in ctx.layout.linears():
            ctx.quantize(name)
