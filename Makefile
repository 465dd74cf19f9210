# Two commands for a fresh machine (Python 3.11 and pip): `make demo` and `make test`.
# Each creates .venv and installs requirements.txt (and MONAI Label, see there) into it when that has not
# been done yet.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: demo test install clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps monailabel==0.8.5
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m monai.bundle run --config_file "['bundle/configs/inference.json','bundle/configs/demo.json']"

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf demo
