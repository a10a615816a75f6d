"""The fused CPU kernel of multi-scale deformable attention, forward and backward, in C++.

It is compiled on first use with torch's own toolchain (torch.utils.cpp_extension, cached per machine), so
installing the package never needs a compiler; where none is available, `build()` raises and the op falls
back to the grid_sample reference (`ms_deform_attn.load_cpu_kernel`). The source lives in this file so that it
travels with the model's code to the Hub.

Per (batch, query, head) the forward sums, over L levels x K points, attention weight x bilinear sample of
the D channels of the value map, reading each corner's D channels contiguously; nothing per level is
materialised. With many queries (the encoder) both directions read the value maps one head at a time,
(B, M, S, D), so that a head's maps stay in cache. The backward runs one (batch, head) pair per task, so the
value gradient of that pair is owned by one thread and needs no atomics.
"""

import logging
import os

logger = logging.getLogger(__name__)

HEADER = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// Element strides of the value maps: (B, S, M, D) as given, or (B, M, S, D), one head after the other, where a
// head's maps stay in cache; the copy into the latter pays off when queries are many (the encoder).
struct Layout {
  int64_t batch, head, pixel;
};

std::pair<torch::Tensor, Layout> choose_layout(const torch::Tensor& value, int64_t Q) {
  const int64_t S = value.size(1), M = value.size(2), D = value.size(3);
  if (4 * Q >= S) return {value.permute({0, 2, 1, 3}).contiguous(), Layout{M * S * D, S * D, D}};
  return {value, Layout{S * M * D, D, M * D}};
}

"""

# compiled twice, in namespace avx2 (for x86-64 CPUs with AVX2 and FMA) and in namespace portable
KERNELS = r"""
// Bilinear corners of one sampling point: x = loc_x * W - 0.5, y = loc_y * H - 0.5 (grid_sample,
// align_corners=False); corners outside the map count as zeros.
template <typename T>
struct Corners {
  int64_t offset[4];   // pixel index y * W + x of each corner, -1 when outside
  T weight[4];         // bilinear weights
  T dweight_dx[4];     // their derivatives in x and y (pixels)
  T dweight_dy[4];
  bool any;
  Corners(T loc_x, T loc_y, int64_t H, int64_t W) {
    // the same arithmetic as the reference: grid = 2 * loc - 1, then grid_sample's unnormalisation
    const T gx = loc_x * T(2) - T(1), gy = loc_y * T(2) - T(1);
    const T x = ((gx + T(1)) * W - T(1)) / T(2), y = ((gy + T(1)) * H - T(1)) / T(2);
    // a NaN coordinate fails every comparison, so its point goes on, with NaN weights and (as (int64_t)NaN is
    // undefined) every corner put outside: the NaN reaches the output and the gradients, as in the reference
    any = !(x <= T(-1) || y <= T(-1) || x >= T(W) || y >= T(H));
    if (!any) return;
    const bool nan = std::isnan(x) || std::isnan(y);
    const T fx0 = std::floor(x), fy0 = std::floor(y);
    const int64_t x0 = nan ? -2 : (int64_t)fx0, y0 = nan ? -2 : (int64_t)fy0;
    const T fx = x - fx0, fy = y - fy0;
    const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
    const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
    const T wx[4] = {T(1) - fx, fx, T(1) - fx, fx};
    const T wy[4] = {T(1) - fy, T(1) - fy, fy, fy};
    const T dx[4] = {T(-1), T(1), T(-1), T(1)};
    const T dy[4] = {T(-1), T(-1), T(1), T(1)};
    for (int c = 0; c < 4; ++c) {
      const bool inside = xs[c] >= 0 && xs[c] < W && ys[c] >= 0 && ys[c] < H;
      offset[c] = inside ? ys[c] * W + xs[c] : -1;
      weight[c] = wx[c] * wy[c];
      dweight_dx[c] = dx[c] * wy[c];
      dweight_dy[c] = wx[c] * dy[c];
    }
  }
};

// Forward for one head dimension D (a compile-time DC lets the accumulator live in registers; DC = 0: any D).
// Each point is one pass over D, its four corners together.
template <typename T, int DC>
void forward_impl(const T* v, const Layout& lay, const int64_t* shape, const int64_t* start, const T* lp, const T* ap,
                  T* o, int64_t B, int64_t M, int64_t D_, int64_t Q, int64_t L, int64_t K) {
  const int64_t D = DC > 0 ? DC : D_;
  // one head after the other (its maps, (S, D), stay in cache), queries in order within a head
  at::parallel_for(0, B * M * Q, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(DC > 0 ? 0 : D), zeros(D, T(0));  // corners outside the map read zeros
    for (int64_t bmq = begin; bmq < end; ++bmq) {
      const int64_t b = bmq / (M * Q), m = (bmq / Q) % M, q = bmq % Q;
      const int64_t bqm = (b * Q + q) * M + m;
      T fixed[DC > 0 ? DC : 1];
      T* acc = DC > 0 ? fixed : scratch.data();
      for (int64_t d = 0; d < D; ++d) acc[d] = T(0);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = shape[2 * l], W = shape[2 * l + 1];
        const T* level = v + b * lay.batch + m * lay.head + start[l] * lay.pixel;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t p = (bqm * L + l) * K + k;
          const Corners<T> c(lp[2 * p], lp[2 * p + 1], H, W);
          if (!c.any) continue;
          const T a = ap[p];
          const T w00 = a * c.weight[0], w01 = a * c.weight[1], w10 = a * c.weight[2], w11 = a * c.weight[3];
          const T* r00 = c.offset[0] < 0 ? zeros.data() : level + c.offset[0] * lay.pixel;
          const T* r01 = c.offset[1] < 0 ? zeros.data() : level + c.offset[1] * lay.pixel;
          const T* r10 = c.offset[2] < 0 ? zeros.data() : level + c.offset[2] * lay.pixel;
          const T* r11 = c.offset[3] < 0 ? zeros.data() : level + c.offset[3] * lay.pixel;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += w00 * r00[d] + w01 * r01[d] + w10 * r10[d] + w11 * r11[d];
        }
      }
      T* out = o + bqm * D;
      for (int64_t d = 0; d < D; ++d) out[d] = acc[d];
    }
  });
}

// Backward for one head dimension D (compile-time DC as in the forward; DC = 0: any D).
template <typename T, int DC>
void backward_impl(const T* go, const T* v, const Layout& lay, const int64_t* shape, const int64_t* start, const T* lp,
                   const T* ap, T* gv, T* gl, T* ga,
                   int64_t B, int64_t M, int64_t D_, int64_t Q, int64_t L, int64_t K) {
  const int64_t D = DC > 0 ? DC : D_;
  at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
    // corners outside the map read zeros from, and write into, this scratch row instead
    std::vector<T> zeros(D, T(0)), sink(D);
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t bqm = (b * Q + q) * M + m;
        const T* g = go + bqm * D;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = shape[2 * l], W = shape[2 * l + 1];
          const int64_t base = b * lay.batch + m * lay.head + start[l] * lay.pixel;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t p = (bqm * L + l) * K + k;
            const Corners<T> c(lp[2 * p], lp[2 * p + 1], H, W);
            if (!c.any) {  // outside the map: no gradient
              ga[p] = gl[2 * p] = gl[2 * p + 1] = T(0);
              continue;
            }
            const T a = ap[p];
            const T* src[4];
            T* dst[4];
            for (int i = 0; i < 4; ++i) {
              src[i] = c.offset[i] < 0 ? zeros.data() : v + base + c.offset[i] * lay.pixel;
              dst[i] = c.offset[i] < 0 ? sink.data() : gv + base + c.offset[i] * lay.pixel;
            }
            const T w0 = a * c.weight[0], w1 = a * c.weight[1], w2 = a * c.weight[2], w3 = a * c.weight[3];
            const T *s0 = src[0], *s1 = src[1], *s2 = src[2], *s3 = src[3];
            T *d0 = dst[0], *d1 = dst[1], *d2 = dst[2], *d3 = dst[3];
            T dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;  // <grad_out, corner value>
            #pragma omp simd reduction(+:dot0, dot1, dot2, dot3)
            for (int64_t d = 0; d < D; ++d) {
              const T gd = g[d];
              dot0 += gd * s0[d];
              dot1 += gd * s1[d];
              dot2 += gd * s2[d];
              dot3 += gd * s3[d];
              d0[d] += w0 * gd;
              d1[d] += w1 * gd;
              d2[d] += w2 * gd;
              d3[d] += w3 * gd;
            }
            const T dot[4] = {dot0, dot1, dot2, dot3};
            T grad_a = 0, grad_x = 0, grad_y = 0;
            for (int i = 0; i < 4; ++i) {
              grad_a += c.weight[i] * dot[i];
              grad_x += c.dweight_dx[i] * dot[i];
              grad_y += c.dweight_dy[i] * dot[i];
            }
            ga[p] = grad_a;
            gl[2 * p] = a * grad_x * W;
            gl[2 * p + 1] = a * grad_y * H;
          }
        }
      }
    }
  });
}

// The kernel for a head dimension D: a compile-time D where it is a common one, else any D.
template <typename T>
decltype(&forward_impl<T, 0>) forward_for(int64_t D) {
  return D == 32 ? &forward_impl<T, 32> : D == 64 ? &forward_impl<T, 64> : D == 16 ? &forward_impl<T, 16>
                                                                                    : &forward_impl<T, 0>;
}

template <typename T>
decltype(&backward_impl<T, 0>) backward_for(int64_t D) {
  return D == 32 ? &backward_impl<T, 32> : D == 64 ? &backward_impl<T, 64> : D == 16 ? &backward_impl<T, 16>
                                                                                      : &backward_impl<T, 0>;
}
"""

ENTRY = r"""
// The AVX2 + FMA build of the kernels where the CPU has both, else the portable one: the binary runs on every
// CPU of its architecture, as a cached build shared across machines (one home folder) must.
bool use_avx2() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// value (B, S, M, D), shapes (L, 2), starts (L), loc (B, Q, M, L, K, 2), attn (B, Q, M, L, K) -> (B, Q, M, D)
torch::Tensor forward(torch::Tensor value, torch::Tensor shapes, torch::Tensor starts, torch::Tensor loc,
                      torch::Tensor attn) {
  const int64_t B = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), K = loc.size(4);
  auto out = torch::empty({B, Q, M, D}, value.options());
  auto [maps, layout] = choose_layout(value, Q);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward", [&] {
    auto kernel = use_avx2() ? avx2::forward_for<scalar_t>(D) : portable::forward_for<scalar_t>(D);
    kernel(maps.data_ptr<scalar_t>(), layout, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
           loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, M, D, Q, L, K);
  });
  return out;
}

// -> grad_value (B, S, M, D), grad_loc (B, Q, M, L, K, 2), grad_attn (B, Q, M, L, K)
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor value, torch::Tensor shapes,
                                    torch::Tensor starts, torch::Tensor loc, torch::Tensor attn) {
  const int64_t B = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), K = loc.size(4);
  auto [maps, layout] = choose_layout(value, Q);
  auto grad_maps = torch::zeros_like(maps);
  auto grad_loc = torch::empty_like(loc);  // every entry is written
  auto grad_attn = torch::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    auto kernel = use_avx2() ? avx2::backward_for<scalar_t>(D) : portable::backward_for<scalar_t>(D);
    kernel(grad_out.data_ptr<scalar_t>(), maps.data_ptr<scalar_t>(), layout, shapes.data_ptr<int64_t>(),
           starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
           grad_maps.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(),
           B, M, D, Q, L, K);
  });
  auto grad_value = maps.data_ptr() == value.data_ptr() ? grad_maps : grad_maps.permute({0, 2, 1, 3}).contiguous();
  return {grad_value, grad_loc, grad_attn};
}
"""

CPP_SOURCE = (
    HEADER
    + '#if defined(__x86_64__)\n#pragma GCC push_options\n#pragma GCC target("avx2,fma")\n'
    + f"namespace avx2 {{{KERNELS}}}\n"
    + "#pragma GCC pop_options\n#endif\n"
    + f"namespace portable {{{KERNELS}}}\n"
    + "#if !defined(__x86_64__)\nnamespace avx2 = portable;\n#endif\n"
    + ENTRY
)

CFLAGS = ["-O3", "-fopenmp"]  # no -march: the kernels pick their instruction set at run time


def build_folder() -> str:
    """Where the extension is built and cached: torch's extensions folder (TORCH_EXTENSIONS_DIR, by default
    ~/.cache/torch_extensions), one subfolder per Python, torch and source + flags, so that environments with
    another torch on the same machine keep their own build instead of rebuilding in turn."""
    import hashlib
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    digest = hashlib.sha256((CPP_SOURCE + " ".join(CFLAGS)).encode()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return os.path.join(root, "deformable_detr", f"{python}_torch{torch.__version__}_{digest}")


def build():
    """The compiled extension, built on first use and cached in `build_folder()`. Raises where it cannot be built
    (no compiler, no headers)."""
    from torch.utils.cpp_extension import load_inline

    folder = build_folder()
    os.makedirs(folder, exist_ok=True)
    built = os.path.exists(os.path.join(folder, "deformable_detr_ms_deform_attn_cpu.so"))
    logger.info(
        "%s the fused CPU multi-scale deformable attention kernel in %s",
        "loading" if built else "compiling (once)",
        folder,
    )
    return load_inline(
        name="deformable_detr_ms_deform_attn_cpu",
        cpp_sources=[CPP_SOURCE],
        functions=["forward", "backward"],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=folder,
        verbose=False,
    )
