"""Task folder of the ``LMMS_EVAL_PLUGINS=llmc.eval`` plugin (lmms-eval requires one; local MME tasks are
generated per data folder by ``python -m llmc.eval.mme_local`` and passed with ``--include_path``)."""
