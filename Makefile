# The two commands: `make demo` (train + evaluate on the embedded dataset) and `make test`.
# Each first creates .venv and installs everything (scripts/setup_env.sh); later calls reuse it.
PY := .venv/bin/python

.PHONY: setup test demo docs clean

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/train_net.py --config-file configs/shapes/slim_mask_rcnn_shapes.yaml

# The API reference (Sphinx autodoc over slim_det's docstrings) in docs/_build/html; any Sphinx
# warning fails the build.
docs: setup
	.venv/bin/sphinx-build -W --keep-going -b html docs/api docs/_build/html

clean:
	rm -rf output datasets/shapes
