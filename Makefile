# The front door. `make` builds, `make test` runs the whole suite, `make train` trains the
# tiny model on the built-in corpus. All three install missing Debian packages first
# (when root; otherwise they print the apt-get line and stop).
BUILD ?= build
JOBS  ?= $(shell nproc)

.PHONY: all build deps test train clean sanitize valgrind

# ctest [ARGS], then the skipped tests by name (tests/ctest_summary.py, which under CI=true also
# fails on a skip that names no machine reason). The status is ctest's when ctest failed.
nm_ctest = rm -f ctest-junit.xml; rc=0; ctest --output-on-failure -j $(JOBS) --output-junit ctest-junit.xml $(1) || rc=$$?; \
	python3 $(CURDIR)/tests/ctest_summary.py ctest-junit.xml || [ $$rc -ne 0 ] || rc=1; exit $$rc

all: build

deps:
	@scripts/deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

test: deps
	@scripts/deps.sh --with-venv
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DNM_PYTHON=$(CURDIR)/.venv/bin/python3 >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)
	@cd $(BUILD) || exit 1; $(call nm_ctest)

# Continues runs/tiny if it is there (rm -rf runs/tiny to start over).
train: build
	@$(BUILD)/nanomegatron train --config configs/tiny-train.json --out runs/tiny --resume
	@$(BUILD)/nanomegatron sample --model runs/tiny --prompt "The " --tokens 200 --seed 1

# Unit tests and the hostile-input CLI test (label sanitize) under AddressSanitizer +
# UndefinedBehaviorSanitizer.
sanitize: deps
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DNM_SANITIZE=ON >/dev/null
	@cmake --build build-asan -j $(JOBS)
	@cd build-asan || exit 1; $(call nm_ctest,-L 'unit|sanitize')

# Unit tests under valgrind memcheck.
valgrind: deps
	@scripts/valgrind.sh

clean:
	rm -rf $(BUILD) build-asan build-vg
