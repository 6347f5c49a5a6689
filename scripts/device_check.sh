#!/usr/bin/env bash
# The device check: lisa on a CUDA GPU, in one short run.
#
#   scripts/device_check.sh build   # on the build machine (no GPU needed): the CUDA binaries,
#                                   # stripped and compressed into target/device-check/ (< 64 MiB)
#   scripts/device_check.sh run     # on the GPU machine, from the repository root with
#                                   # target/device-check/ copied there; no cargo needed
#   scripts/device_check.sh gemm    # on the GPU machine: the toy step with each f32 GEMM kernel
#   scripts/device_check.sh sd      # on the GPU machine: the SD arm alone (below), ~5 minutes
#   scripts/device_check.sh dp      # on the GPU machine: NCCL all-reduce bandwidth on every
#                                   # visible GPU (a communicator of one on a one-GPU machine)
#                                   # for a small bucket, a 25 MiB bucket and SD 1.5's ControlNet
#                                   # gradient (backends/cubecl/benches/allreduce.rs), then the
#                                   # toy LISA step alone and in an NCCL group of one, alternated
#                                   # (trainer/benches/step.rs, arm dp_pair), ~2 minutes
#
# `run` does, each stage under its own time limit (the whole at most ~8 minutes):
#   1. the backend conformance suite on CUDA (every check of lisa-conformance, forward, backward,
#      finite differences, bad inputs), with a missing GPU fatal (LISA_REQUIRE_CUDA=1);
#   2. the toy step benchmark (trainer/benches/step.rs) on CUDA: baseline, LISA, LISA
#      sub-batch 16, prior pass + decoder, pretraining step, DDIM-25 sampling of 64 images;
#   3. the PyTorch reference of the same configuration (scripts/bench/torch_toy.py) on CUDA, when
#      a Python with a CUDA-enabled torch is on the machine (LISA_BENCH_PYTHON, else python3);
#      otherwise it says so and prints lisa's figures alone;
#   4. the table of ratios (scripts/bench/table.py), with the GPU's name above it;
#   5. stages 2-4 again for the training and sampling arms with TF32 tensor cores allowed on
#      both sides (LISA_BENCH_TF32=1, torch_toy.py --tf32); stages 2-4 compare exact f32;
#   6. the op benchmark (backends/cubecl/benches/ops.rs) on CUDA next to lisa-cpu on the same
#      machine: GEMM, convolutions, element-wise ops, and the cost of one launch of a tiny op.
# `sd` (its own command, so that each fits one device call): SD 1.5 size (random weights from
# SD 1.5's config), 64x64 latents, batch ${LISA_SD_BATCH:-4}, 77 tokens: lisa's ControlNet
# training step (baseline, LISA at down_5) on CUDA in f32 (fused attention; lisa has no
# half-precision arithmetic yet), each arm with the device memory its pools reserved; then
# PyTorch + diffusers doing the same step (scripts/bench/torch_sd_step.py: ControlNetModel.from_unet,
# SDPA, AdamW) in f32 and under autocast bf16, with DDIM-20 sampling of 4 images, each arm
# with torch.cuda.max_memory_allocated.
# Exit status: non-zero when the conformance suite or the benchmark fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=target/device-check

build() {
    echo "== building the CUDA binaries (bench profile, cuda feature)"
    mkdir -p "$OUT_DIR"
    local conf bench sd ops
    # One profile for both (bench = release + line tables) so that the dependencies build once.
    cargo test --profile bench -p lisa-cubecl --features cuda --test conformance_cuda --no-run \
        --message-format=json >"$OUT_DIR/build.json" 2>"$OUT_DIR/build.log" || fail_build
    conf="$(exe_of conformance_cuda <"$OUT_DIR/build.json")"
    cargo bench -p lisa-trainer --features cuda --bench step --no-run \
        --message-format=json >"$OUT_DIR/build.json" 2>"$OUT_DIR/build.log" || fail_build
    bench="$(exe_of step <"$OUT_DIR/build.json")"
    cargo bench -p lisa-trainer --features cuda --bench sd_step --no-run \
        --message-format=json >"$OUT_DIR/build.json" 2>"$OUT_DIR/build.log" || fail_build
    sd="$(exe_of sd_step <"$OUT_DIR/build.json")"
    cargo bench -p lisa-cubecl --features cuda --bench ops --no-run \
        --message-format=json >"$OUT_DIR/build.json" 2>"$OUT_DIR/build.log" || fail_build
    ops="$(exe_of ops <"$OUT_DIR/build.json")"
    cargo bench -p lisa-cubecl --features cuda --bench allreduce --no-run \
        --message-format=json >"$OUT_DIR/build.json" 2>"$OUT_DIR/build.log" || fail_build
    local allreduce
    allreduce="$(exe_of allreduce <"$OUT_DIR/build.json")"
    rm -f "$OUT_DIR/build.json" "$OUT_DIR/build.log"
    [ -x "$conf" ] && [ -x "$bench" ] && [ -x "$sd" ] && [ -x "$ops" ] || {
        echo "device_check: cargo built no conformance_cuda, step, sd_step or ops executable" >&2
        exit 1
    }
    for pair in "conformance_cuda:$conf" "step_cuda:$bench" "sd_step_cuda:$sd" "ops_cuda:$ops" "allreduce_cuda:$allreduce"; do
        local name="${pair%%:*}" exe="${pair#*:}"
        cp "$exe" "$OUT_DIR/$name"
        strip --strip-debug "$OUT_DIR/$name"
        xz -T0 -6 -f "$OUT_DIR/$name"
    done
    git rev-parse HEAD >"$OUT_DIR/commit" 2>/dev/null || echo unknown >"$OUT_DIR/commit"
    ls -l "$OUT_DIR"
    echo "carry target/device-check to the GPU machine and run: scripts/device_check.sh run"
}

# Stops unless `build` left the compressed binaries in $OUT_DIR.
have_binaries() {
    [ -f "$OUT_DIR/conformance_cuda.xz" ] && [ -f "$OUT_DIR/step_cuda.xz" ] && [ -f "$OUT_DIR/sd_step_cuda.xz" ] &&
        [ -f "$OUT_DIR/ops_cuda.xz" ] || {
        echo "device_check: no binaries in $OUT_DIR: run 'scripts/device_check.sh build' on the build machine first" >&2
        exit 2
    }
}

# Decompresses the binaries into a fresh temporary folder and prints its path.
unpack_binaries() {
    local bin name
    bin="$(mktemp -d "${TMPDIR:-/tmp}/lisa-device-bin.XXXXXX")"
    for name in conformance_cuda step_cuda sd_step_cuda ops_cuda allreduce_cuda; do
        [ -f "$OUT_DIR/$name.xz" ] || continue
        xz -dc "$OUT_DIR/$name.xz" >"$bin/$name"
        chmod +x "$bin/$name"
    done
    echo "$bin"
}

# The table of lisa/torch ratios from a bench output ($1) and a torch_toy.py JSON ($2).
ratios() {
    if [ -s "$2" ] && [ -s "$1" ]; then
        python3 scripts/bench/table.py --lisa "$1" --torch "$2" | sed -n '1,20p'
    else
        echo "no ratios: the PyTorch side did not run (lisa's figures are above)"
    fi
}

fail_build() {
    tail -30 "$OUT_DIR/build.log" >&2
    echo "device_check: the CUDA build failed (log above)" >&2
    exit 1
}

# The executable of the artifact named $1 in cargo's JSON messages on stdin.
exe_of() {
    python3 -c '
import json, sys
exe = ""
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and (m.get("target") or {}).get("name") == sys.argv[1] and m.get("executable"):
        exe = m["executable"]
print(exe)' "$1"
}

run() {
    have_binaries
    if [ ! -e /proc/driver/nvidia/version ] && [ ! -e /dev/nvidiactl ]; then
        echo "device_check: no NVIDIA driver on this machine; run this on the GPU machine" >&2
        exit 2
    fi
    local work
    # LISA_DEVICE_LOG_DIR keeps the full logs (conformance, benchmark, PyTorch) after the run.
    work="${LISA_DEVICE_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/lisa-device.XXXXXX")}"
    mkdir -p "$work"
    # cudarc opens libcuda and libnvrtc by name at run time: when the loader does not know
    # libnvrtc, add the folders that hold it (the CUDA toolkit's, the Python wheels').
    if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
        local nvrtc_dirs
        nvrtc_dirs="$(find /usr/local/cuda* /usr/lib /opt -name 'libnvrtc.so*' 2>/dev/null |
            xargs -r -n1 dirname | sort -u | paste -sd: || true)"
        [ -n "$nvrtc_dirs" ] && export LD_LIBRARY_PATH="$nvrtc_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "libnvrtc from: ${nvrtc_dirs:-not found}"
    fi
    local bin
    bin="$(unpack_binaries)"
    echo "== machine"
    echo "binaries built from commit $(cat "$OUT_DIR/commit" 2>/dev/null || echo unknown)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
    else
        echo "GPU: nvidia-smi not found"
    fi
    echo "CPU: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1) ($(nproc) CPUs)"
    local status=0

    echo "== 1. conformance suite on CUDA"
    if LISA_REQUIRE_CUDA=1 timeout 200 "$bin/conformance_cuda" --include-ignored --test-threads 1 \
        >"$work/conformance.txt" 2>&1; then
        grep -E '^test result:' "$work/conformance.txt"
    else
        status=1
        grep -E '^test .* FAILED|^test result:' "$work/conformance.txt" | head -30
        grep -m3 -A2 'panicked at' "$work/conformance.txt" || true
        echo "conformance on CUDA: FAILED (failing checks and the first panics above, or the time limit)"
    fi

    echo "== 2. toy step benchmark on CUDA"
    if LISA_BENCH_BACKEND=cuda LISA_BENCH_STEPS="${LISA_BENCH_STEPS:-13}" LISA_BENCH_SAMPLE_REPEATS=3 \
        timeout 180 "$bin/step_cuda" --bench >"$work/lisa.txt" 2>"$work/lisa.err"; then
        cat "$work/lisa.txt"
    else
        status=1
        cat "$work/lisa.txt"
        tail -20 "$work/lisa.err" | cut -c1-400
        echo "step benchmark on CUDA: FAILED (exit or timeout)"
    fi

    echo "== 3. PyTorch reference on CUDA"
    local py="${LISA_BENCH_PYTHON:-python3}"
    local torch_ok=""
    if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        torch_ok=1
        timeout 120 "$py" scripts/bench/torch_toy.py --device cuda --steps 10 --warmup 3 --sample-repeats 3 \
            --only baseline,lisa,lisa_sub16,prior_pass,decoder,pretrain,sample --json "$work/torch.json" \
            | grep -E '^  |^torch' || echo "PyTorch reference on CUDA: failed or timed out"
    else
        echo "PyTorch reference: not run (no Python with a CUDA-enabled torch here; set LISA_BENCH_PYTHON)"
    fi

    echo "== 4. ratios (lisa-cubecl on CUDA vs PyTorch on CUDA, both exact f32)"
    ratios "$work/lisa.txt" "$work/torch.json"

    echo "== 5. the same with TF32 tensor cores allowed on both sides (training and sampling arms)"
    if LISA_BENCH_BACKEND=cuda LISA_BENCH_TF32=1 LISA_BENCH_ARMS=baseline,lisa,pretrain,sample \
        LISA_BENCH_STEPS="${LISA_BENCH_STEPS:-13}" LISA_BENCH_SAMPLE_REPEATS=3 \
        timeout 120 "$bin/step_cuda" --bench >"$work/lisa_tf32.txt" 2>"$work/lisa_tf32.err"; then
        if [ -n "$torch_ok" ]; then
            timeout 100 "$py" scripts/bench/torch_toy.py --device cuda --tf32 --steps 10 --warmup 3 \
                --sample-repeats 3 --only baseline,lisa,pretrain,sample --json "$work/torch_tf32.json" \
                >/dev/null || echo "PyTorch reference with TF32: failed or timed out"
        fi
        ratios "$work/lisa_tf32.txt" "$work/torch_tf32.json"
    else
        status=1
        cat "$work/lisa_tf32.txt"
        tail -5 "$work/lisa_tf32.err" | cut -c1-400
        echo "step benchmark on CUDA with TF32: FAILED (exit or timeout)"
    fi

    echo "== 6. op benchmark: lisa-cpu and lisa-cubecl on CUDA, same machine"
    if timeout 150 "$bin/ops_cuda" --bench >"$work/ops.txt" 2>&1; then
        cat "$work/ops.txt"
    else
        status=1
        tail -30 "$work/ops.txt" | cut -c1-400
        echo "op benchmark: FAILED (exit or timeout)"
    fi
    rm -rf "$bin"
    [ -n "${LISA_DEVICE_LOG_DIR:-}" ] || rm -rf "$work"
    return $status
}

# The toy baseline step with each f32 GEMM kernel lisa-cubecl can use (LISA_CUBECL_F32_GEMM),
# and the conformance suite with the exact ones (the others round to TF32, beyond f32 tolerance).
gemm_kernels() {
    have_binaries
    local bin
    bin="$(unpack_binaries)"
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
    echo "| f32 GEMM kernel | baseline step | pretraining step |"
    echo "|---|---|---|"
    local kernel
    for kernel in tiled simple_unit double_unit auto simple_cyclic_cmma double_cyclic_cmma \
        ordered_double_cmma simple_tma_cmma specialized_tma_cmma; do
        local out
        out="$(LISA_CUBECL_F32_GEMM=$kernel LISA_BENCH_BACKEND=cuda LISA_BENCH_ARMS=baseline,pretrain \
            LISA_BENCH_STEPS=8 timeout 60 "$bin/step_cuda" --bench 2>&1)" || true
        local base pre
        base="$(sed -n 's/^| baseline | \([^|]*\) |.*/\1/p' <<<"$out")"
        pre="$(sed -n 's/^| pretraining step | \([^|]*\) |.*/\1/p' <<<"$out")"
        echo "| $kernel | ${base:-failed} | ${pre:-failed} |"
    done
    for kernel in tiled double_unit; do
        echo "conformance with LISA_CUBECL_F32_GEMM=$kernel:"
        LISA_CUBECL_F32_GEMM=$kernel LISA_REQUIRE_CUDA=1 timeout 100 "$bin/conformance_cuda" --include-ignored \
            --test-threads 1 2>&1 | grep -E '^test .* FAILED|^test result:' || true
    done
    rm -rf "$bin"
}

# The SD arm: lisa's SD-size training step on CUDA next to PyTorch + diffusers on the same GPU.
sd_arm() {
    have_binaries
    if [ ! -e /proc/driver/nvidia/version ] && [ ! -e /dev/nvidiactl ]; then
        echo "device_check: no NVIDIA driver on this machine; run this on the GPU machine" >&2
        exit 2
    fi
    if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
        local nvrtc_dirs
        nvrtc_dirs="$(find /usr/local/cuda* /usr/lib /opt -name 'libnvrtc.so*' 2>/dev/null |
            xargs -r -n1 dirname | sort -u | paste -sd: || true)"
        [ -n "$nvrtc_dirs" ] && export LD_LIBRARY_PATH="$nvrtc_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    local bin batch="${LISA_SD_BATCH:-4}" status=0 arm
    bin="$(unpack_binaries)"
    echo "binaries built from commit $(cat "$OUT_DIR/commit" 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
    # LISA_SD_PRECISIONS: the precisions to run on both sides (default bf16, the target; add
    # "no" for f32, which takes as long again and may not fit the 8-minute budget).
    local precisions="${LISA_SD_PRECISIONS:-bf16}" precision
    for precision in $precisions; do
        echo "== SD 1.5 size, batch $batch, 64x64 latents, 77 tokens: lisa-cubecl on CUDA, precision $precision"
        for arm in baseline lisa sample; do
            LISA_BENCH_BACKEND=cuda LISA_BENCH_BATCH="$batch" LISA_BENCH_STEPS=3 LISA_BENCH_ARMS=$arm \
                LISA_BENCH_PRECISION="$precision" LISA_BENCH_SAMPLE_IMAGES="$batch" \
                timeout 100 "$bin/sd_step_cuda" --bench 2>&1 | grep -E 'sd_step|step|sample|panicked|rror' | cut -c1-300 ||
                { status=1; echo "lisa SD $arm ($precision) on CUDA: FAILED (exit or timeout)"; }
        done
    done
    local py="${LISA_BENCH_PYTHON:-python3}" dtype
    if "$py" -c 'import torch, diffusers, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        for precision in $precisions; do
            dtype="$precision"; [ "$dtype" = no ] && dtype=f32
            echo "== the same in PyTorch + diffusers on CUDA, $dtype"
            timeout 150 "$py" scripts/bench/torch_sd_step.py --device cuda --dtype "$dtype" --batch "$batch" \
                --steps 3 --warmup 1 --arms baseline,lisa,sample 2>&1 | grep -E 'step|torch_sd_step|rror' ||
                echo "PyTorch + diffusers ($dtype): failed or timed out"
        done
    else
        echo "PyTorch + diffusers: not run (no Python with CUDA torch and diffusers; set LISA_BENCH_PYTHON)"
    fi
    rm -rf "$bin"
    return $status
}

# NCCL's all-reduce on this machine's GPUs (lisa_cubecl::nccl, the collective of --gpus and of
# launched runs).
dp_arm() {
    have_binaries
    local bin
    bin="$(unpack_binaries)"
    [ -x "$bin/allreduce_cuda" ] || { echo "device_check: no allreduce_cuda binary: rebuild with 'build'" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
    local status=0
    timeout 120 "$bin/allreduce_cuda" --bench 2>&1 | grep -E 'allreduce|panicked|rror' || status=1
    echo "== the toy LISA step alone and in an NCCL group of one (the collective path), alternated"
    LISA_BENCH_BACKEND=cuda LISA_BENCH_ARMS=dp_pair timeout 120 "$bin/step_cuda" --bench 2>&1 |
        grep -E 'paired|group of one|rror|panicked' || status=1
    rm -rf "$bin"
    return $status
}

case "${1:-}" in
    build) build ;;
    dp) dp_arm ;;
    run) run ;;
    gemm) gemm_kernels ;;
    sd) sd_arm ;;
    *)
        echo "usage: scripts/device_check.sh build|run|gemm|sd|dp" >&2
        exit 2
        ;;
esac
