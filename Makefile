# Quick start on a fresh Debian 12 machine (root, Python 3.11):
#   make demo   - the node end to end on embedded defaults
#   make test   - the whole test suite
# Both set up what they need (Debian packages, virtualenv) and are safe to run twice.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
DEB_PACKAGES := dcmtk dicom3tools orthanc mricron-data poppler-utils openjph-tools chromium chromium-driver

.PHONY: setup system-deps venv parity-env demo test corpus lint bench-ingest bench-scaleout bench-preprocess bench-inference chaos demo-model mutation clean

setup: system-deps venv

system-deps:
	@missing=""; \
	for tool in /usr/bin/storescu /usr/bin/dsrdump /usr/bin/dciodvfy /usr/sbin/Orthanc /usr/bin/pdftoppm /usr/bin/ojph_compress /usr/bin/chromedriver \
	            /usr/share/mricron/templates/ch2.nii.gz; do [ -e $$tool ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $(DEB_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES) >/dev/null; \
	  else \
	    echo "missing Debian packages; as root run: apt-get install $(DEB_PACKAGES)"; exit 1; \
	  fi; \
	fi

venv: $(DEPS)

$(DEPS): requirements.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to 2.13.0: on this machine kind pip takes the CPU wheel from local disk.
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(BIN)/dicom-node demo

test: setup parity-env
	$(BIN)/python -m pytest
	# ViT parity with MONAI 1.3 (M3D-CLIP's encoder), in its own environment (numpy < 2)
	.venv-parity/bin/python -m pytest -q -p no:cacheprovider --noconftest tests/model/test_parity.py

# Every scanner-like study of tests/support/corpus.py at the scanners' sizes, through the node (make test sends
# them at affordable sizes); the table goes to var/corpus-report.md and var/corpus-report.csv.
corpus: setup
	DICOM_NODE_CORPUS=full $(BIN)/python -m pytest -v -p no:cacheprovider tests/end_to_end/test_corpus.py

parity-env: .venv-parity/.deps-installed

.venv-parity/.deps-installed: requirements-parity.txt
	test -x .venv-parity/bin/python || $(PYTHON) -m venv .venv-parity
	.venv-parity/bin/pip install -q -r requirements-parity.txt
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy dicom_node pipeline model structured_reports core tests benchmarks
	$(BIN)/lint-imports

bench-ingest: setup
	$(BIN)/python -m benchmarks.bench_ingest

bench-scaleout: setup
	$(BIN)/python -m benchmarks.bench_scaleout

# The committed demonstration model (model/demo): pretrain the demonstration base's ViT on unlabeled
# synthetic brains (about 2 minutes on 2 quiet cores), then train its parts on the labelled synthetic cohort.
demo-model: setup
	$(BIN)/dicom-node model pretrain --out model/demo --size 64
	$(BIN)/dicom-node synth cohort --out var/cohort64 --subjects 240 --size 64 --seed 1
	$(BIN)/dicom-node train var/cohort64/manifest.csv --out var/runs/demo --demo-base \
	    --demo-vision model/demo/vision.safetensors --note-numbers --inputs mri+note --epochs 20 \
	    --lr-projection 1e-3 --lr-head 1e-2 --seed 0 --no-progress --export-demo model/demo

chaos: setup
	$(BIN)/python -m benchmarks.chaos

# Mutation testing of the modules whose decisions matter (docs/mutation.md): mutmut, pinned in
# requirements-mutation.txt, one module at a time against the tests that cover it. Long; not part of make test.
mutation: setup
	$(BIN)/pip install -q -r requirements-mutation.txt
	rm -rf mutants
	$(BIN)/python -m benchmarks.mutation

bench-preprocess: setup
	$(BIN)/python -m benchmarks.bench_preprocess

bench-inference: setup
	$(BIN)/python -m benchmarks.bench_inference

clean:
	rm -rf var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
