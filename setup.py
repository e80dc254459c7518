"""Build of jax_transducer's compiled kernels.

The CPU extension (``jax_transducer._cpu``) is always built. The CUDA extension
(``jax_transducer._cuda``) is built whenever nvcc is found; ``JAX_TRANSDUCER_CUDA`` overrides:
``0`` never builds it, ``1`` requires it (the build fails without nvcc), unset or ``auto`` builds
it when nvcc is found. nvcc is looked up at ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, on ``PATH``,
then at ``/usr/local/cuda/bin``. ``JAX_TRANSDUCER_CUDA_ARCHS`` overrides the list of SM
versions (default ``80;90``; PTX of the last one is embedded too).

``JAX_TRANSDUCER_SANITIZE=1`` builds the CPU extension with AddressSanitizer and
UndefinedBehaviorSanitizer (run Python with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``
and ``ASAN_OPTIONS=detect_leaks=0``; see .ci/sanitize). ``JAX_TRANSDUCER_CPU_CLONES=0`` builds
the float kernels for baseline x86-64 only, without their x86-64-v3 clones: what CPUs without
AVX2 run, for tests (.ci/baseline).
"""

import os
import shutil
import subprocess
import sys

import jaxlib
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# The typed XLA FFI headers ship inside jaxlib (jax.ffi.include_dir() points here); importing
# jaxlib rather than jax keeps the build's requirements small.
FFI_INCLUDE = os.path.join(os.path.dirname(jaxlib.__file__), "include")
# -fno-trapping-math lets the lattice loops vectorise (selects become blends); no code relies on
# floating-point traps.
CXX_FLAGS = ["-O3", "-fvisibility=hidden", "-fno-trapping-math", "-Wno-psabi"]
SANITIZE = os.environ.get("JAX_TRANSDUCER_SANITIZE", "0").strip().lower() in ("1", "on", "true", "yes")
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer", "-g"]
NO_CLONES = os.environ.get("JAX_TRANSDUCER_CPU_CLONES", "1").strip().lower() in ("0", "off", "false", "no")
CUDA_SOURCES = ["lib/cuda/lattice_cuda.cu"]


def find_nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc") or next(
        (p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None
    )


def cuda_wanted():
    mode = os.environ.get("JAX_TRANSDUCER_CUDA", "auto").strip().lower()
    nvcc = find_nvcc()
    if mode in ("0", "off", "false", "no"):
        return None
    if mode in ("1", "on", "true", "yes") and nvcc is None:
        sys.exit("JAX_TRANSDUCER_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc


def find_cuda_root(nvcc):
    """The toolkit whose headers and libraries go with nvcc: nvcc's own parent folder, unless
    nvcc is a wrapper script elsewhere (then $CUDA_HOME, $CUDA_PATH or /usr/local/cuda)."""
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                  os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return root
    sys.exit(f"jax_transducer: found {nvcc} but no CUDA toolkit headers next to it "
             "(set CUDA_HOME)")


class BuildExt(build_ext):
    """Compiles the .cu sources with nvcc into objects that the CUDA extension links."""

    def build_extension(self, ext):
        nvcc = getattr(ext, "nvcc", None)
        if nvcc:
            archs = os.environ.get("JAX_TRANSDUCER_CUDA_ARCHS", "80;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            os.makedirs(self.build_temp, exist_ok=True)
            for src in CUDA_SOURCES:
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "--expt-relaxed-constexpr", *gencode]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                ext.extra_objects.append(obj)
        super().build_extension(ext)


extensions = [
    Pybind11Extension(
        "jax_transducer._cpu",
        ["lib/ffi/cpu.cc"],
        include_dirs=[FFI_INCLUDE],
        extra_compile_args=(CXX_FLAGS + (SANITIZER_FLAGS if SANITIZE else [])
                            + (["-DJT_NO_CPU_CLONES"] if NO_CLONES else [])),
        extra_link_args=SANITIZER_FLAGS if SANITIZE else [],
        cxx_std=17,
    )
]

NVCC = cuda_wanted()
if NVCC:
    cuda_root = find_cuda_root(NVCC)
    cuda_ext = Pybind11Extension(
        "jax_transducer._cuda",
        ["lib/ffi/cuda.cc"],
        include_dirs=[FFI_INCLUDE, os.path.join(cuda_root, "include")],
        library_dirs=[os.path.join(cuda_root, "lib64")],
        # The static runtime keeps the module loadable without a CUDA toolkit at run time; it
        # works on the primary context that XLA's CUDA plugin uses.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=CXX_FLAGS,
        cxx_std=17,
    )
    cuda_ext.nvcc = NVCC
    extensions.append(cuda_ext)
    print(f"jax_transducer: building CUDA kernels with {NVCC}", flush=True)
else:
    print("jax_transducer: building without CUDA kernels (nvcc not found or disabled)", flush=True)

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
