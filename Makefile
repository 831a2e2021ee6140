# Membrane build. `make test` and `make demo` install what they need (see scripts/setup.sh).
CLANG    ?= clang
BPFTOOL  ?= bpftool
BUILD    := build
OBJDIR   := src/membrane/bpfobj
VMLINUX  := $(BUILD)/vmlinux.h
BPF_SRCS := $(wildcard bpf/*.bpf.c)
BPF_OBJS := $(patsubst bpf/%.bpf.c,$(OBJDIR)/%.bpf.o,$(BPF_SRCS))
ABI_PY   := src/membrane/abi.py
CNI_PLUGIN := src/membrane/native/membrane-cni
NATIVE   := src/membrane/native/libeventfmt.so src/membrane/native/libringdrain.so $(CNI_PLUGIN)
HUBBLE   := src/membrane/hubble
HUBBLE_PROTOS := $(wildcard $(HUBBLE)/proto/*/*.proto)
HUBBLE_PY := $(HUBBLE)/observer/observer_pb2_grpc.py
TETRAGON := src/membrane/tetragon
TETRAGON_PROTOS := $(wildcard $(TETRAGON)/proto/tetragon/*.proto)
TETRAGON_PY := $(TETRAGON)/tetragon/events_pb2.py
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_x86 \
              -I/usr/include/x86_64-linux-gnu -Ibpf -Ibpf/include -I$(BUILD)
VENV     := .venv
PY       := $(VENV)/bin/python
PYTHON   ?= python3

.PHONY: all setup bpf native hubble tetragon bytecode cni test test-unit demo bench lint clean
all: setup bpf bytecode cni

setup:
	@bash scripts/setup.sh

# The BPF objects, their ABI as Python, the user-space helpers (native/: the trace tools'
# formatter, the flow ring's drain thread, the CNI plugin executable), Hubble's API as Python (hubble) and Tetragon's
# (tetragon).
bpf: $(BPF_OBJS) $(ABI_PY) $(NATIVE) $(HUBBLE_PY) $(TETRAGON_PY)

native: $(NATIVE)

src/membrane/native/lib%.so: native/%.c
	$(CLANG) -O2 -g -Wall -Werror -shared -fPIC -pthread -o $@.tmp $< && mv $@.tmp $@

# Static: `membrane cni install` copies it onto nodes whose libc may be older than ours.
$(CNI_PLUGIN): native/cni_plugin.c
	$(CLANG) -O2 -g -Wall -Wextra -Werror -static -o $@.tmp $< && mv $@.tmp $@

$(VMLINUX):
	@mkdir -p $(BUILD)
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(OBJDIR)/%.bpf.o: bpf/%.bpf.c $(VMLINUX)
	@mkdir -p $(OBJDIR)
	$(CLANG) $(BPF_CFLAGS) -MD -MF $(BUILD)/$*.d -c $< -o $@

# The enums of bpf/abi/*.h as Python (membrane.abi), from the objects' BTF.
$(ABI_PY): scripts/gen_abi.py $(BPF_OBJS)
	$(PYTHON) scripts/gen_abi.py $(BPF_OBJS) > $@.tmp && mv $@.tmp $@

# Hubble's flow/observer protobuf API (membrane.hubble) as Python modules, generated with
# grpcio-tools; protoc writes `from flow import ...`, made package-relative here.
hubble: $(HUBBLE_PY)

$(HUBBLE_PY): $(HUBBLE_PROTOS)
	$(PY) -m grpc_tools.protoc -I$(HUBBLE)/proto --python_out=$(HUBBLE) --pyi_out=$(HUBBLE) \
		--grpc_python_out=$(HUBBLE) $(HUBBLE_PROTOS)
	for d in flow observer relay; do touch $(HUBBLE)/$$d/__init__.py; done
	sed -i -E 's/^(from|import) (flow|observer|relay)([. ])/\1 membrane.hubble.\2\3/' \
		$(HUBBLE)/*/*_pb2*.py $(HUBBLE)/*/*.pyi

# Tetragon's event API (membrane.tetragon) as Python modules, made package-relative as above.
tetragon: $(TETRAGON_PY)

$(TETRAGON_PY): $(TETRAGON_PROTOS)
	$(PY) -m grpc_tools.protoc -I$(TETRAGON)/proto --python_out=$(TETRAGON) --pyi_out=$(TETRAGON) \
		$(TETRAGON_PROTOS)
	touch $(TETRAGON)/tetragon/__init__.py
	sed -i -E 's/^(from|import) tetragon([. ])/\1 membrane.tetragon.tetragon\2/' \
		$(TETRAGON)/tetragon/*_pb2.py $(TETRAGON)/tetragon/*.pyi

-include $(wildcard $(BUILD)/*.d)

# The package's modules compiled ahead, as an installed package has them: where
# PYTHONDONTWRITEBYTECODE is set every CLI start would otherwise compile them (~60 ms).
bytecode: $(HUBBLE_PY) $(TETRAGON_PY) $(ABI_PY)
	$(PY) -m compileall -q src/membrane

# The CNI plugin executable where runtimes look for plugins (/opt/cni/bin, /usr/lib/cni);
# no network config: `membrane cni install` writes one (tests use their own directories).
cni: setup $(CNI_PLUGIN)
	$(PY) -c 'from membrane.cni.install import DEFAULT_BIN_DIRS as d, install_plugin; install_plugin(d)'

test: setup bpf bytecode
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

test-unit: setup bpf bytecode
	$(VENV)/bin/pytest -q tests/unit

demo: setup bpf bytecode
	$(PY) -m membrane.demo

bench: setup bpf bytecode
	$(PY) -m bench.run_all

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(BUILD) $(OBJDIR) $(ABI_PY) $(NATIVE) $(HUBBLE)/flow $(HUBBLE)/observer $(HUBBLE)/relay \
		$(TETRAGON)/tetragon
