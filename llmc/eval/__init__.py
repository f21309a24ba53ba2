"""Evaluation of llmc models: lmms-eval integration, local MME, fidelity metrics, reports.

* :mod:`llmc.eval.lmms_wrapper`: ``LLMCLMM``, the lmms-eval model ``llmc`` over any adapter;
* :mod:`llmc.eval.lmms_entry`: the ``lmms_eval.models`` entry point (``--model llmc``);
* :mod:`llmc.eval.lmms_cli`: ``python -m llmc.eval.lmms_cli`` = lmms-eval's CLI with ``llmc`` registered;
* :mod:`llmc.eval.mme_local`: MME / mme_synth from local files as a task; per-category scores;
* :mod:`llmc.eval.fidelity`: KL / top-1 / answer agreement against the float model;
* :mod:`llmc.eval.run`: ``evaluate_position`` and ``write_report`` for the job runner;
* :mod:`llmc.eval.generation`: batched greedy generation with an adapter (no lmms-eval).
* :mod:`llmc.eval.lmms_compat`: the one import point of lmms-eval (keeps loguru handlers).

Nothing here is imported by ``import llmc.eval`` (lmms-eval is slow to import).
"""
