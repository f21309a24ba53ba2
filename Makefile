# Two commands do all set-up from a fresh clone (the environment is made from the lock on first use):
#   make demo   the main job on the embedded default model (configs/default.yml)
#   make test   the test suite (what CI runs after the same install)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test env doctor

env: $(VENV)/.llmc-installed

$(VENV)/.llmc-installed: requirements.lock setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m llmc doctor
	touch $@

demo: env
	$(PY) tpu/llm_quant.py --config_path configs/default.yml --overwrite

test: env
	$(PY) -m pytest -q tests

doctor: env
	$(PY) -m llmc doctor
