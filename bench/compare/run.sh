#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Times PyTorch on the MLA decode shapes of bench/cpu/bench_mla.cpp (bench/compare/torch_mla.py)
# and on the MoE shapes of bench/cpu/bench_moe.cpp (bench/compare/torch_moe.py)
# and says which BLAS torch uses. Arguments go to torch_mla.py (--help lists them).
#
# Needs Debian's python3-torch (1.13, linked against libblas.so.3; with libopenblas0-openmp
# installed that is OpenBLAS built with OpenMP): apt-get install python3-torch libopenblas0-openmp
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# Debian's torch is installed for the system interpreter, which a pyenv or venv python3 on PATH
# may not see.
PYTHON="${PYTHON:-/usr/bin/python3}"
if ! "${PYTHON}" -c 'import torch' 2>/dev/null; then
  echo "bench/compare/run.sh: ${PYTHON} cannot import torch; apt-get install python3-torch" >&2
  exit 1
fi

# OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, where the environment sets them, pin OpenBLAS to a
# kernel set and cache size that are slower on this machine: unset them for this command only.
run() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "${PYTHON}" "$@"; }

# Which BLAS torch uses: its build configuration, then the BLAS libraries actually mapped into
# the process once a matrix product has run (the Debian build links libblas.so.3, whose
# alternative picks the implementation).
run - <<'EOF'
import torch
torch.set_num_threads(2)
torch.randn(256, 256) @ torch.randn(256, 256)
torch.randn(64, 64).bfloat16() @ torch.randn(64, 64).bfloat16()
config = torch.__config__.show()
blas_info = [part.strip() for part in config.replace("\n", ",").split(",")
             if part.strip().startswith(("BLAS_INFO", "LAPACK_INFO", "USE_MKLDNN", "USE_OPENMP"))]
print(f"torch {torch.__version__}: {', '.join(blas_info)}; "
      f"mkldnn (oneDNN) available: {torch.backends.mkldnn.is_available()}")
libs = set()
with open("/proc/self/maps", encoding="utf-8") as maps:
    for line in maps:
        path = line.split()[-1]
        if any(key in path for key in ("blas", "mkl", "dnnl", "gomp", "libomp")):
            libs.add(path)
print("BLAS/threading libraries loaded:", *sorted(libs), sep="\n  ")
try:
    import threadpoolctl
    for pool in threadpoolctl.threadpool_info():
        print(f"threadpoolctl: {pool.get('internal_api')} {pool.get('version')} "
              f"({pool.get('threading_layer', '')}), {pool.get('num_threads')} threads")
except ImportError:
    pass
print()
EOF

run torch_mla.py "$@"
# The MoE shapes of bench/cpu/bench_moe.cpp (gate, plan + dispatch + combine, V2-Lite layer);
# TORCH_MOE_ARGS passes options to it (e.g. TORCH_MOE_ARGS="--layer-tokens 1,64").
run torch_moe.py ${TORCH_MOE_ARGS:-}
