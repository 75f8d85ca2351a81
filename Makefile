# gpubox: build, install, test.  `make install` honours DESTDIR and PREFIX.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
DOCDIR ?= $(PREFIX)/share/doc/gpubox
SYSTEMUNITDIR ?= $(LIBDIR)/systemd/system
GENERATORDIR ?= $(LIBDIR)/systemd/system-generators
UDEVRULESDIR ?= $(LIBDIR)/udev/rules.d
DEFINITIONSDIR ?= /etc/gpubox
CARGO ?= cargo
TARGET_DIR ?= target

BINARIES = gpubox-supervisor gpuboxctl gpubox-generator
DOCS = README.md $(wildcard docs/*.md)

.PHONY: all build install uninstall check test demo clean

all: build

build:
	GPUBOX_SYSTEMUNITDIR=$(SYSTEMUNITDIR) $(CARGO) build --release --locked

install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(GENERATORDIR) $(DESTDIR)$(SYSTEMUNITDIR) \
		$(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DEFINITIONSDIR)
	install -m 0755 $(TARGET_DIR)/release/gpubox-supervisor $(TARGET_DIR)/release/gpuboxctl $(DESTDIR)$(BINDIR)/
	install -m 0755 $(TARGET_DIR)/release/gpubox-generator $(DESTDIR)$(GENERATORDIR)/
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' units/gpu@.service \
		> $(DESTDIR)$(SYSTEMUNITDIR)/gpu@.service
	chmod 0644 $(DESTDIR)$(SYSTEMUNITDIR)/gpu@.service
	for rules in udev-rules/*.rules; do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' $$rules > $(DESTDIR)$(UDEVRULESDIR)/$$(basename $$rules); \
		chmod 0644 $(DESTDIR)$(UDEVRULESDIR)/$$(basename $$rules); \
	done
	install -m 0644 $(DOCS) $(DESTDIR)$(DOCDIR)/
	install -m 0644 examples/*.gpubox $(DESTDIR)$(DOCDIR)/examples/

uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,gpubox-supervisor gpuboxctl)
	rm -f $(DESTDIR)$(GENERATORDIR)/gpubox-generator
	rm -f $(DESTDIR)$(SYSTEMUNITDIR)/gpu@.service
	rm -f $(addprefix $(DESTDIR)$(UDEVRULESDIR)/,$(notdir $(wildcard udev-rules/*.rules)))
	rm -rf $(DESTDIR)$(DOCDIR)
	@echo "Definitions in $(DESTDIR)$(DEFINITIONSDIR) are yours and were left in place."

# Every test: unit, golden files, systemd-analyze verify, privileged (as root), VM system tests.
check test:
	tests/run-all

clean:
	$(CARGO) clean

# The README's first command: build, then run a real container with whatever GPUs the host has.
demo:
	tests/install-deps
	$(CARGO) build --release --locked -p gpubox-supervisor
	$(TARGET_DIR)/release/gpubox-supervisor run --definition examples/hello.gpubox

# System tests in a VM (tests/vm/README.md): the scenarios that pass today, or boot the VM with
# gpubox installed and a root shell on its serial console. Both need root.
.PHONY: vm-test vm-shell
vm-test:
	tests/vm/run $(VM_SCENARIOS)

vm-shell:
	tests/vm/shell
