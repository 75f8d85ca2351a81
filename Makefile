# gpubox: build, install, test.  `make install` honours DESTDIR and PREFIX.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
DOCDIR ?= $(PREFIX)/share/doc/gpubox
SYSTEMUNITDIR ?= $(LIBDIR)/systemd/system
GENERATORDIR ?= $(LIBDIR)/systemd/system-generators
UDEVRULESDIR ?= $(LIBDIR)/udev/rules.d
SYSUSERSDIR ?= $(LIBDIR)/sysusers.d
MANDIR ?= $(PREFIX)/share/man
# Shell completion scripts, where each shell looks for those of packages.
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
DEFINITIONSDIR ?= /etc/gpubox
CARGO ?= cargo
PANDOC ?= pandoc
TARGET_DIR ?= target

# The workspace's version, for the man pages and the Debian package.
VERSION := $(shell sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
BINARIES = gpubox-supervisor gpuboxctl gpubox-generator
DOCS = README.md $(wildcard docs/*.md)
# Manual pages: docs/NAME.SECTION.md is the source of target/man/NAME.SECTION.
MANPAGES = $(patsubst docs/%.md,$(TARGET_DIR)/man/%,$(wildcard docs/*.[1-8].md))
DEBDIR ?= $(TARGET_DIR)/debian

.PHONY: all build man check-man install uninstall deb check test demo clean

all: build man

build:
	GPUBOX_SYSTEMUNITDIR=$(SYSTEMUNITDIR) $(CARGO) build --release --locked

# Manual pages from their Markdown with pandoc and docs/man.lua (which says what it changes).
# Dated by SOURCE_DATE_EPOCH, else the page's last commit, else the file.
man: $(MANPAGES)

$(TARGET_DIR)/man/%: docs/%.md docs/man.lua Cargo.toml
	@mkdir -p $(@D)
	@date=$${SOURCE_DATE_EPOCH:+$$(date -u -d "@$$SOURCE_DATE_EPOCH" +%F)}; \
	date=$${date:-$$(git log -1 --format=%cs -- $< 2>/dev/null)}; \
	date=$${date:-$$(date -u -r $< +%F)}; \
	echo "$(PANDOC) $< -> $@"; \
	$(PANDOC) --standalone --from markdown --to man --lua-filter docs/man.lua \
		--metadata date="$$date" --metadata footer="gpubox $(VERSION)" \
		--metadata header="gpubox manual" --output $@ $<

# Every page renders without a warning in an 80-column terminal (as man(1) and lintian render
# them), and has a NAME section that whatis/apropos can read.
check-man: man
	tests/man-check $(MANPAGES)

install: build man
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(GENERATORDIR) $(DESTDIR)$(SYSTEMUNITDIR) \
		$(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(DOCDIR)/examples \
		$(DESTDIR)$(DEFINITIONSDIR)
	install -m 0755 $(TARGET_DIR)/release/gpubox-supervisor $(TARGET_DIR)/release/gpuboxctl $(DESTDIR)$(BINDIR)/
	install -m 0755 $(TARGET_DIR)/release/gpubox-generator $(DESTDIR)$(GENERATORDIR)/
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' units/gpu@.service \
		> $(DESTDIR)$(SYSTEMUNITDIR)/gpu@.service
	chmod 0644 $(DESTDIR)$(SYSTEMUNITDIR)/gpu@.service
	for rules in udev-rules/*.rules; do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' $$rules > $(DESTDIR)$(UDEVRULESDIR)/$$(basename $$rules); \
		chmod 0644 $(DESTDIR)$(UDEVRULESDIR)/$$(basename $$rules); \
	done
	install -m 0644 sysusers.d/gpubox.conf $(DESTDIR)$(SYSUSERSDIR)/gpubox.conf
	for page in $(MANPAGES); do \
		install -D -m 0644 $$page $(DESTDIR)$(MANDIR)/man$${page##*.}/$$(basename $$page); \
	done
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	$(TARGET_DIR)/release/gpuboxctl completions bash > $(DESTDIR)$(BASHCOMPDIR)/gpuboxctl
	$(TARGET_DIR)/release/gpuboxctl completions zsh > $(DESTDIR)$(ZSHCOMPDIR)/_gpuboxctl
	$(TARGET_DIR)/release/gpuboxctl completions fish > $(DESTDIR)$(FISHCOMPDIR)/gpuboxctl.fish
	chmod 0644 $(DESTDIR)$(BASHCOMPDIR)/gpuboxctl $(DESTDIR)$(ZSHCOMPDIR)/_gpuboxctl $(DESTDIR)$(FISHCOMPDIR)/gpuboxctl.fish
	install -m 0644 $(DOCS) $(DESTDIR)$(DOCDIR)/
	install -m 0644 examples/*.gpubox $(DESTDIR)$(DOCDIR)/examples/

uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,gpubox-supervisor gpuboxctl)
	rm -f $(DESTDIR)$(GENERATORDIR)/gpubox-generator
	rm -f $(DESTDIR)$(SYSTEMUNITDIR)/gpu@.service
	rm -f $(addprefix $(DESTDIR)$(UDEVRULESDIR)/,$(notdir $(wildcard udev-rules/*.rules)))
	rm -f $(DESTDIR)$(SYSUSERSDIR)/gpubox.conf
	rm -f $(DESTDIR)$(BASHCOMPDIR)/gpuboxctl $(DESTDIR)$(ZSHCOMPDIR)/_gpuboxctl $(DESTDIR)$(FISHCOMPDIR)/gpuboxctl.fish
	for page in $(notdir $(MANPAGES)); do rm -f $(DESTDIR)$(MANDIR)/man$${page##*.}/$$page; done
	rm -rf $(DESTDIR)$(DOCDIR)
	@echo "Definitions in $(DESTDIR)$(DEFINITIONSDIR) are yours and were left in place."
	@echo "The group gpubox, if systemd-sysusers made it, was left in place."

# The Debian package target/debian/gpubox_VERSION_ARCH.deb: `make install PREFIX=/usr` into a
# staging tree (so that only the rules above know where files go), packed by packaging/deb/pack.
# `make deb CARGO=true` packs the programs already in target/release without running cargo
# (they must have been built for PREFIX=/usr: the generator's unit directory is built in).
deb:
	rm -rf $(DEBDIR)/root
	$(MAKE) --no-print-directory install DESTDIR=$(abspath $(DEBDIR))/root PREFIX=/usr
	packaging/deb/pack $(DEBDIR)/root $(VERSION) $(DEBDIR)

# Every test: man pages, unit, golden files, systemd-analyze verify, privileged (as root), VM
# system tests.
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
