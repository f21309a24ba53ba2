"""``--model llmc`` for the ``LMMS_EVAL_PLUGINS=llmc.eval`` plugin route (see ``llmc.eval.lmms_wrapper``)."""
from llmc.eval.lmms_wrapper import LLMCLMM

__all__ = ["LLMCLMM"]
