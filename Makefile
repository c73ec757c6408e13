# AFD: a disaggregated Attention/FFN decode cluster for Step3.
# make            build everything into build/bin (CUDA parts when nvcc is found)
# make deps       install the Debian packages the build and tests need
# make test       deps + build + every test suite, then again under the sanitizers;
#                 each pass ends with "N passed, N failed" (FAST=1: the first pass only)
# make demo       deps + build + the main job on the embedded tiny model
# make bench      deps + build + the CPU benchmarks on the mini model
# options: V=1 (show commands), SANITIZE=1 (ASan+UBSan, build in build/san),
#          CUDA=auto|0|1, DEBUG=1
.DEFAULT_GOAL := all
.SUFFIXES:

V ?= 0
SANITIZE ?= 0
CUDA ?= auto
DEBUG ?= 0
FAST ?= 0
Q := $(if $(filter 1,$(V)),,@)
msg = $(if $(filter 1,$(V)),,@printf '  %-6s %s\n' $(1) $(2))

ifeq ($(SANITIZE),1)
BUILD ?= build/san
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
BUILD ?= build
SANFLAGS :=
endif

NVCC ?= /usr/local/cuda/bin/nvcc
ifeq ($(CUDA),auto)
HAVE_CUDA := $(if $(wildcard $(NVCC)),1,0)
else
HAVE_CUDA := $(CUDA)
endif

CC ?= gcc
OPT := $(if $(filter 1,$(DEBUG)),-O0,-O2)
LLHTTP_DIR ?= /usr/share/llhttp
LLHTTP_INC ?= /usr/share/include/llhttp
INCLUDES := -Icommon/util -Icommon/model -Icommon/kernels -Icommon/kernels/cuda -Icommon/net -Icommon/tok -Icommon/bench -I$(BUILD)/proto -I$(LLHTTP_INC)
CFLAGS := -std=c11 -Wall -Wextra -Werror $(OPT) -g -MMD -MP -pthread $(SANFLAGS) $(INCLUDES)
LDFLAGS := -pthread -Wl,--as-needed $(SANFLAGS)
LDLIBS := -lucp -lucs -luv -lprotobuf-c -lcjson -lopenblas -lpcre2-8 -lm

COMMON_SRC := $(wildcard common/util/*.c common/model/*.c common/kernels/*.c common/kernels/cpu/*.c common/net/*.c common/tok/*.c common/bench/*.c)
# the cuda backend's host planning is plain C, built (and unit-tested) everywhere; its
# loader goes into every program (-u: a weak reference pulls no archive member), so that
# any build can load a libafdcuda.so: the real one, or the CPU emulator's (AFD_CUDA_LIB)
COMMON_SRC += common/kernels/cuda/kn_cuda_host.c common/kernels/cuda/kn_cuda_load.c
LDFLAGS += -Wl,--undefined=kn_cuda_create
PROTO_SRC := $(wildcard proto/*.proto)
PROTO_C := $(PROTO_SRC:proto/%.proto=$(BUILD)/proto/%.pb-c.c)
PROTO_H := $(PROTO_C:.c=.h)
PROTO_OBJ := $(PROTO_C:%.c=%.o)
LLHTTP_OBJ := $(BUILD)/obj/llhttp/llhttp.o $(BUILD)/obj/llhttp/api.o $(BUILD)/obj/llhttp/http.o
COMMON_OBJ := $(COMMON_SRC:%.c=$(BUILD)/obj/%.o) $(PROTO_OBJ) $(LLHTTP_OBJ)
LIBCOMMON := $(BUILD)/lib/libafdcommon.a

TOOLS := $(basename $(notdir $(wildcard tools/*.c)))
BENCH := $(basename $(notdir $(wildcard bench/*.c)))
# the daemons: every .c of their folder (afdctl is the coordinator folder's CLI)
ATTN_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard attn_node/*.c))
FFN_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard ffn_node/*.c))
COORD_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(filter-out coordinator/afdctl.c,$(wildcard coordinator/*.c)))
DAEMONS := $(if $(ATTN_OBJ),attn_node) $(if $(FFN_OBJ),ffn_node) $(if $(COORD_OBJ),afd_coordinator) \
	$(if $(wildcard coordinator/afdctl.c),afdctl)
BINS := $(TOOLS:%=$(BUILD)/bin/%) $(BENCH:%=$(BUILD)/bin/%) $(DAEMONS:%=$(BUILD)/bin/%)

UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)

all: $(BINS)

TEST_TOOLS := $(patsubst tests/tools/%.c,$(BUILD)/tests/%,$(wildcard tests/tools/*.c))

tests: $(UNIT_BINS) $(TEST_TOOLS)

$(BUILD)/obj/%.o: %.c
	$(call msg,CC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(CFLAGS) -c $< -o $@

# generated protobuf-c code: built before anything that may include it
$(BUILD)/proto/%.pb-c.c $(BUILD)/proto/%.pb-c.h: proto/%.proto
	$(call msg,PROTOC,$<)
	@mkdir -p $(BUILD)/proto
	$(Q)protoc-c --proto_path=proto --c_out=$(BUILD)/proto $<

$(BUILD)/proto/%.pb-c.o: $(BUILD)/proto/%.pb-c.c
	$(call msg,CC,$<)
	$(Q)$(CC) $(filter-out -Wextra,$(CFLAGS)) -Wno-missing-braces -c $< -o $@

# llhttp ships as C sources; they are third-party code, compiled without -Wextra
$(BUILD)/obj/llhttp/%.o: $(LLHTTP_DIR)/%.c
	$(call msg,CC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(filter-out -Wextra,$(CFLAGS)) -Wno-unused-parameter -c $< -o $@

$(COMMON_SRC:%.c=$(BUILD)/obj/%.o): | $(PROTO_H)

$(LIBCOMMON): $(COMMON_OBJ)
	$(call msg,AR,$@)
	@mkdir -p $(dir $@)
	$(Q)rm -f $@ && ar rcs $@ $^

$(BUILD)/bin/%: $(BUILD)/obj/tools/%.o $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/%: $(BUILD)/obj/bench/%.o $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/attn_node: $(ATTN_OBJ) $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/ffn_node: $(FFN_OBJ) $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/afd_coordinator: $(COORD_OBJ) $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/afdctl: $(BUILD)/obj/coordinator/afdctl.o $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# helpers the integration tests start (never run as suites themselves)
$(BUILD)/tests/%: $(BUILD)/obj/tests/tools/%.o $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -lcmocka -o $@

# ---- the cuda backend (HAVE_CUDA=1): kernels, cuBLASLt GEMMs and the ops table in
# $(BUILD)/lib/libafdcuda.so, loaded by kn_cuda_create when the backend is asked for
ifeq ($(HAVE_CUDA),1)
CUDA_HOME := $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcudart
NVCCFLAGS := -std=c++17 -O2 -g -arch=sm_90 -Werror all-warnings \
	-Xcompiler -Wall,-Wextra,-Werror,-fPIC $(INCLUDES)
CUDA_DIR := common/kernels/cuda
CUDA_OBJ := $(patsubst %.cu,$(BUILD)/obj/pic/%.o,$(wildcard $(CUDA_DIR)/*.cu)) \
	$(patsubst %.c,$(BUILD)/obj/pic/%.o,$(CUDA_DIR)/kn_cuda.c $(CUDA_DIR)/kn_cuda_gemm.c \
	$(CUDA_DIR)/kn_cuda_host.c)
CUDA_SO := $(BUILD)/lib/libafdcuda.so

$(BUILD)/obj/pic/%.o: %.cu
	$(call msg,NVCC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/pic/%.o: %.c
	$(call msg,CC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(CFLAGS) -fPIC -fvisibility=hidden -I$(CUDA_HOME)/include -c $< -o $@

$(CUDA_SO): $(CUDA_OBJ)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) -shared -Wl,--no-undefined $(SANFLAGS) $^ $(CUDA_LIBS) -lstdc++ -lm -o $@

all: $(CUDA_SO)
tests: $(BUILD)/tests/cuda_bench
$(BUILD)/tests/cuda_check: | $(CUDA_SO)

$(BUILD)/obj/tests/cuda/cuda_bench.o: CFLAGS += -I$(CUDA_HOME)/include

# the benchmark calls the launchers and GEMMs directly
$(BUILD)/tests/cuda_bench: $(BUILD)/obj/tests/cuda/cuda_bench.o $(LIBCOMMON) $(CUDA_SO)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ -Wl,-rpath,'$$ORIGIN/../lib' $(CUDA_LIBS) $(LDLIBS) -o $@
endif

# the whole-backend check goes through kn_backend_create like every program: it runs on a
# GPU (tests/cuda/run.sh) and on the CPU emulator below (make test)
tests: $(BUILD)/tests/cuda_check
$(BUILD)/tests/cuda_check: $(BUILD)/obj/tests/cuda/cuda_check.o $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# ---- the cuda backend on the CPU emulator (tests/cuda/emu): the same sources, the kernels
# compiled as C++, linked with an emulated CUDA runtime and cuBLASLt into
# $(BUILD)/emu/lib/libafdcuda.so (AFD_CUDA_LIB selects it). Needs no CUDA toolkit; not in
# sanitizer builds (the emulator switches stacks).
ifneq ($(SANITIZE),1)
CXX := $(if $(filter default,$(origin CXX)),g++,$(CXX))
EMU_DIR := tests/cuda/emu
EMU_SO := $(BUILD)/emu/lib/libafdcuda.so
EMU_OBJ := $(patsubst common/kernels/cuda/%.cu,$(BUILD)/emu/obj/%.o,$(wildcard common/kernels/cuda/*.cu)) \
	$(patsubst common/kernels/cuda/%.c,$(BUILD)/emu/obj/%.o,common/kernels/cuda/kn_cuda.c \
	common/kernels/cuda/kn_cuda_gemm.c common/kernels/cuda/kn_cuda_host.c) $(BUILD)/emu/obj/kn_emu.o
EMU_CXXFLAGS := -std=c++17 -O2 -g -fPIC -fvisibility=hidden -Wall -Wextra -Werror \
	-Wno-unknown-pragmas -MMD -MP -DKN_CUDA_EMU -I$(EMU_DIR)/include $(INCLUDES)

$(BUILD)/emu/obj/%.o: common/kernels/cuda/%.cu
	$(call msg,EMU,$<)
	@mkdir -p $(dir $@)
	$(Q)$(CXX) -x c++ $(EMU_CXXFLAGS) -c $< -o $@

$(BUILD)/emu/obj/%.o: common/kernels/cuda/%.c
	$(call msg,EMU,$<)
	@mkdir -p $(dir $@)
	$(Q)$(CC) -I$(EMU_DIR)/include $(CFLAGS) -fPIC -fvisibility=hidden -c $< -o $@

$(BUILD)/emu/obj/kn_emu.o: $(EMU_DIR)/kn_emu.cc
	$(call msg,EMU,$<)
	@mkdir -p $(dir $@)
	$(Q)$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

$(EMU_SO): $(EMU_OBJ)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CXX) -shared -Wl,--no-undefined $^ -pthread -ldl -lm -o $@

# the emulator's own checks: kernels and faults of its own, linked with it directly
$(BUILD)/emu/obj/emu_selftest.o: $(EMU_DIR)/emu_selftest.cc
	$(call msg,EMU,$<)
	@mkdir -p $(dir $@)
	$(Q)$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

$(BUILD)/emu/emu_selftest: $(BUILD)/emu/obj/emu_selftest.o $(BUILD)/emu/obj/kn_emu.o
	$(call msg,LD,$@)
	$(Q)$(CXX) $^ -pthread -ldl -lm -o $@

tests: $(EMU_SO) $(BUILD)/emu/emu_selftest
endif

# ---- fuzz targets (docs/fuzzing.md): libFuzzer + ASan + UBSan with clang, in $(BUILD)/fuzz.
# make fuzz-build builds them; make fuzz runs each for FUZZ_SECONDS (FUZZ_JOBS at a time) on
# a corpus kept in $(BUILD)/fuzz/corpus. The common code they reach is compiled again with clang and
# -fsanitize=fuzzer-no-link (coverage); coord_main.c without its main, for its option table.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 600
FUZZ_JOBS ?= 1
FUZZ_DIR := $(BUILD)/fuzz
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS := -std=c11 -Wall -Wextra -O1 -g -MMD -MP -pthread $(FUZZ_SAN) \
	-fsanitize=fuzzer-no-link $(INCLUDES) -Icoordinator -Itests/fuzz
FUZZ_BINS := $(patsubst tests/fuzz/%.c,$(FUZZ_DIR)/%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_HELPERS := $(patsubst %.c,$(FUZZ_DIR)/obj/%.o,$(wildcard tests/fuzz/fz_*.c))
FUZZ_LIB_SRC := $(wildcard common/util/*.c common/net/*.c common/tok/*.c) \
	common/model/mdl_config.c common/model/mdl_st.c \
	$(filter-out coordinator/afdctl.c,$(wildcard coordinator/*.c))
FUZZ_LIB_OBJ := $(FUZZ_LIB_SRC:%.c=$(FUZZ_DIR)/obj/%.o) \
	$(PROTO_C:$(BUILD)/proto/%.c=$(FUZZ_DIR)/obj/proto/%.o) \
	$(LLHTTP_OBJ:$(BUILD)/obj/%=$(FUZZ_DIR)/obj/%)

$(FUZZ_DIR)/obj/tests/fuzz/%.o: tests/fuzz/%.c | $(PROTO_H)
	$(call msg,FUZZCC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -Werror -c $< -o $@

$(FUZZ_DIR)/obj/%.o: %.c | $(PROTO_H)
	$(call msg,FUZZCC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_XFLAGS) -c $< -o $@

$(FUZZ_DIR)/obj/coordinator/coord_main.o: FUZZ_XFLAGS := -Dmain=coord_main_unused

$(FUZZ_DIR)/obj/proto/%.o: $(BUILD)/proto/%.c
	$(call msg,FUZZCC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -Wno-missing-braces -c $< -o $@

$(FUZZ_DIR)/obj/llhttp/%.o: $(LLHTTP_DIR)/%.c
	$(call msg,FUZZCC,$<)
	@mkdir -p $(dir $@)
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -Wno-unused-parameter -c $< -o $@

$(FUZZ_DIR)/libafdfuzz.a: $(FUZZ_LIB_OBJ)
	$(call msg,AR,$@)
	$(Q)rm -f $@ && ar rcs $@ $^

$(FUZZ_BINS): $(FUZZ_DIR)/%: $(FUZZ_DIR)/obj/tests/fuzz/%.o $(FUZZ_HELPERS) $(FUZZ_DIR)/libafdfuzz.a
	$(call msg,LD,$@)
	$(Q)$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -pthread $^ $(LDLIBS) -o $@

fuzz-build: $(FUZZ_BINS)

# the binary seeds (frames, data-plane messages, safetensors files), with the daemons' encoders
$(FUZZ_DIR)/mkseeds: $(BUILD)/obj/tests/fuzz/mkseeds.o $(LIBCOMMON)
	$(call msg,LD,$@)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

fuzz-seeds: $(FUZZ_DIR)/mkseeds
	$(Q)$< tests/fuzz/corpus

fuzz: fuzz-build
	@tests/fuzz/run.sh --build $(BUILD) --seconds $(FUZZ_SECONDS) --jobs $(FUZZ_JOBS)

.PHONY: fuzz fuzz-build fuzz-seeds
-include $(shell find $(FUZZ_DIR)/obj -name '*.d' 2>/dev/null)

deps:
	@scripts/deps.sh

# make test: every suite, then (unless SANITIZE=1 or FAST=1) the same suites again under
# ASan+UBSan+LSan in build/san (without CUDA, which cannot run here, and without the fuzz
# test, whose targets are sanitizer builds already)
test: deps
	@$(MAKE) --no-print-directory all tests
	@BUILD=$(BUILD) TESTS_SKIP=$(if $(filter 1,$(SANITIZE)),test_fuzz,) tests/run_all.sh
ifeq ($(SANITIZE)$(FAST),00)
	@echo "=== the same suites under ASan+UBSan+LSan (build/san; FAST=1 skips this pass) ==="
	@$(MAKE) --no-print-directory SANITIZE=1 CUDA=0 test
endif

demo: deps
	@$(MAKE) --no-print-directory all
	@BUILD=$(BUILD) scripts/demo.sh

bench: deps
	@$(MAKE) --no-print-directory all
	@BUILD=$(BUILD) bench/run_cpu.sh

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf build

.PHONY: all tests deps test demo bench format clean
.SECONDARY:

-include $(shell find $(BUILD)/obj $(BUILD)/emu/obj -name '*.d' 2>/dev/null)
