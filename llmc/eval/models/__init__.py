"""lmms-eval plugin models: ``LMMS_EVAL_PLUGINS=llmc.eval`` makes ``--model llmc`` resolvable.

lmms-eval 0.7.3 reads ``AVAILABLE_MODELS`` here and imports
``llmc.eval.models.<name>.<class>`` only when the model is asked for.
"""

AVAILABLE_MODELS = {"llmc": "LLMCLMM"}
