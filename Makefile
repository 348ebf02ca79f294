# The README's two commands: `make demo` and `make test`. Everything else is what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-slow bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is capped (<2.15) so pip never pulls an unpinned multi-GB build.
	$(PY) -m pip install --quiet -e '.[dev,onnx]'
	touch $@

data:
	@if [ -d $(FASHION_DIR) ]; then \
		echo "Fashion-MNIST: $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
		&& echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist"; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," \
		     "or pass a torchvision root (kd3 data list shows what is available)."; \
	fi

demo: setup
	$(VENV)/bin/kd3 demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
