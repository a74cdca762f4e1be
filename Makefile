# The two commands: `make demo` (train + evaluate on the embedded dataset) and `make test`.
# Each first creates .venv and installs everything (scripts/setup_env.sh); later calls reuse it.
PY := .venv/bin/python

.PHONY: setup test demo clean

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/train_net.py --config-file configs/shapes/slim_mask_rcnn_shapes.yaml

clean:
	rm -rf output datasets/shapes
