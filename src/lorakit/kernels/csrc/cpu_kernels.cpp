#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// ---- hashed dropout mask ----------------------------------------------------------------------
static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16; return h;
}
#ifdef __AVX2__
// words [w, w + 8): the keep masks (all ones / zero) of elements 2w .. 2w + 15, in element order
static inline void keep16(int64_t w, __m256i s, __m256i thr1, __m256i* lo8, __m256i* hi8) {
  const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i h = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)w), step);
  h = _mm256_xor_si256(_mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x9E3779B9u)), s);
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85EBCA6Bu));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xC2B2AE35u));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  // lane >= thr  <=>  lane > thr - 1 (lanes are 0..65535: the signed compare is exact)
  const __m256i k0 = _mm256_cmpgt_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0xFFFF)), thr1);
  const __m256i k1 = _mm256_cmpgt_epi32(_mm256_srli_epi32(h, 16), thr1);
  const __m256i a = _mm256_unpacklo_epi32(k0, k1), b = _mm256_unpackhi_epi32(k0, k1);
  *lo8 = _mm256_permute2x128_si256(a, b, 0x20);  // elements 2w .. 2w + 7
  *hi8 = _mm256_permute2x128_si256(a, b, 0x31);  // elements 2w + 8 .. 2w + 15
}
#endif
template <typename T> static void run_mask(const T* x, T* o, int64_t n, uint32_t s, uint32_t thr) {
  const int64_t words = n / 2;  // two 16-bit lanes per 32-bit hash
  at::parallel_for(0, words, 16384, [&](int64_t begin, int64_t end) {
    int64_t w = begin;
#ifdef __AVX2__
    if constexpr (std::is_same<T, float>::value) {  // 16 elements per step, in place or not
      const __m256i sv = _mm256_set1_epi32((int)s), thr1 = _mm256_set1_epi32((int)thr - 1);
      const __m256 one = _mm256_set1_ps(1.f);
      for (; w + 8 <= end; w += 8) {
        __m256i m0, m1;
        keep16(w, sv, thr1, &m0, &m1);
        // x * 1.0 or x * 0.0, as the scalar loop (signed zeros, inf and NaN as in x * keep)
        const __m256 k0 = _mm256_and_ps(_mm256_castsi256_ps(m0), one), k1 = _mm256_and_ps(_mm256_castsi256_ps(m1), one);
        _mm256_storeu_ps(o + 2 * w, _mm256_mul_ps(_mm256_loadu_ps(x + 2 * w), k0));
        _mm256_storeu_ps(o + 2 * w + 8, _mm256_mul_ps(_mm256_loadu_ps(x + 2 * w + 8), k1));
      }
    }
#endif
    for (; w < end; ++w) {
      const uint32_t h = fmix32((uint32_t)w * 0x9E3779B9u ^ s);
      const float k0 = (h & 0xFFFFu) >= thr ? 1.f : 0.f;
      const float k1 = (h >> 16) >= thr ? 1.f : 0.f;
      o[2 * w] = T(float(x[2 * w]) * k0);
      o[2 * w + 1] = T(float(x[2 * w + 1]) * k1);
    }
  });
  if (n & 1) {
    const uint32_t h = fmix32((uint32_t)words * 0x9E3779B9u ^ s);
    o[n - 1] = T(float(x[n - 1]) * ((h & 0xFFFFu) >= thr ? 1.f : 0.f));
  }
}
// out = x * keep(seed, threshold), element by element (out may be x: in place)
torch::Tensor apply_mask(torch::Tensor x, int64_t seed, int64_t threshold, torch::Tensor out) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.numel() == out.numel(), "contiguous, same size");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "apply_mask", [&] {
    run_mask<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), (uint32_t)seed,
                       (uint32_t)threshold);
  });
  return out;
}

// a tensor autograd would record an in-place write to (such writes would escape it)
static inline bool recorded(const torch::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }
// what every float32 kernel below takes: a CPU float32 tensor autograd does not record
static inline bool f32_cpu(const torch::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && !recorded(t);
}

// ---- low-rank update for a few rows (decoding) ------------------------------------------------
#ifdef __AVX2__
static inline __m256 hsum8(const __m256* a) {  // lane u = the sum of a[u]'s eight lanes
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif
// y[i] = alpha * (M[i, :] . v) (+ y[i] when accumulate); M (rows, cols) row-major, row stride ld (default cols)
static void matvec(const float* M, int64_t rows, int64_t cols, const float* v, float* y, float alpha,
                   bool accumulate, int64_t ld = -1) {
  if (ld < 0) ld = cols;
  int64_t i = 0;
#ifdef __AVX2__
  const int64_t c8 = cols & ~int64_t(7);
  for (; i + 8 <= rows; i += 8) {  // eight rows at a time: eight accumulators, one horizontal sum
    __m256 a[8];
    for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
    for (int64_t c = 0; c < c8; c += 8) {
      const __m256 vc = _mm256_loadu_ps(v + c);
      for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(_mm256_loadu_ps(M + (i + u) * ld + c), vc, a[u]);
    }
    alignas(32) float s[8];
    _mm256_store_ps(s, hsum8(a));
    for (int u = 0; u < 8; ++u) {
      float t = s[u];
      for (int64_t c = c8; c < cols; ++c) t += M[(i + u) * ld + c] * v[c];
      y[i + u] = accumulate ? y[i + u] + alpha * t : alpha * t;
    }
  }
#endif
  for (; i < rows; ++i) {
    const float* m = M + i * ld;
    float t = 0.f;
#pragma omp simd reduction(+:t)
    for (int64_t c = 0; c < cols; ++c) t += m[c] * v[c];
    y[i] = accumulate ? y[i] + alpha * t : alpha * t;
  }
}
// out (n rows, stride ldo) += s (x (n, k) A^T (k, r)) B^T (r, o), A and B contiguous float32
static void low_rank_add(float* op, int64_t ldo, const float* xp, int64_t n, int64_t k, const float* ap,
                         const float* bp, int64_t r, int64_t o, float s) {
  const int64_t grain = std::max<int64_t>(1, 262144 / ((k + o) * r));  // rows per thread: >= ~256k FMAs
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    float t[1024];
    for (int64_t i = begin; i < end; ++i) {
      matvec(ap, r, k, xp + i * k, t, s, false);      // t = s A x_i
      matvec(bp, o, r, t, op + i * ldo, 1.f, true);   // out_i += B t
    }
  });
}
// A and B of a low-rank update for in-features k: 2-d float32 CPU, contiguous, B's columns = A's rows
static bool low_rank_ok(const torch::Tensor& A, const torch::Tensor& B, int64_t k, int64_t o) {
  if (A.dim() != 2 || B.dim() != 2) return false;
  for (const auto& t : {A, B})
    if (!f32_cpu(t) || !t.is_contiguous()) return false;
  return A.size(0) >= 1 && A.size(0) <= 1024 && A.size(1) == k && B.size(1) == A.size(0) && B.size(0) == o;
}
// out (n, o) += s (x (n, k) A^T (k, r)) B^T (r, o); float32, contiguous (out: or a 2-d column slice),
// not recorded by autograd.
// False: not handled, nothing written.
bool lora_add_(torch::Tensor out, torch::Tensor x, torch::Tensor A, torch::Tensor B, double s) {
  if (A.dim() != 2 || B.dim() != 2) return false;
  const int64_t k = A.size(1), o = B.size(0);
  if (!f32_cpu(out) || !f32_cpu(x) || !x.is_contiguous() || !low_rank_ok(A, B, k, o)) return false;
  if (!out.is_contiguous() && !(out.dim() == 2 && out.stride(1) == 1 && out.stride(0) >= out.size(1))) return false;
  if (k < 1 || x.dim() < 1 || out.dim() < 1 || x.size(-1) != k || out.size(-1) != o ||
      x.numel() / k != out.numel() / std::max<int64_t>(o, 1)) return false;
  const int64_t ldo = out.dim() == 2 ? out.stride(0) : o;  // a 2-d out may be a column slice
  low_rank_add(out.data_ptr<float>(), ldo, x.data_ptr<float>(), x.numel() / k, k, A.data_ptr<float>(),
               B.data_ptr<float>(), A.size(0), o, (float)s);
  return true;
}

// ---- a whole linear layer for a few rows (decoding) --------------------------------------------
// y_j (+)= sum_{i in [i0, i1)} x_j[i] Wt[i, :] for j < n: W stored (k, o) with row stride ldw (GPT-2's
// fan_in_fan_out layout), streamed row by row once for all n rows; y (n, o) is first set to b (or 0)
static void axpy_rows(const float* Wt, int64_t ldw, int64_t i0, int64_t i1, const float* xp, int64_t k, int64_t n,
                      const float* b, float* yp, int64_t o) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < o; ++c) yp[j * o + c] = b ? b[c] : 0.f;
  for (int64_t i = i0; i < i1; ++i) {
    const float* w = Wt + i * ldw;
    for (int64_t j = 0; j < n; ++j) {
      const float xi = xp[j * k + i];
      float* y = yp + j * o;
      int64_t c = 0;
#ifdef __AVX2__
      const __m256 xb = _mm256_set1_ps(xi);
      for (; c + 8 <= o; c += 8)
        _mm256_storeu_ps(y + c, _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + c), _mm256_loadu_ps(y + c)));
#endif
      for (; c < o; ++c) y[c] += xi * w[c];
    }
  }
}
// x (..., k) W^T + b + s (x A^T) B^T for a few float32 rows in one call: W (o, k) contiguous, or the
// transpose of a contiguous (k, o) weight (fan_in_fan_out); A/B undefined: the base linear only.
// The batch-1 matrix-vector product streams W once at close to memory bandwidth (MKL's GEMM entry
// is ~25% slower there, cold weights, one thread). None: not handled.
c10::optional<torch::Tensor> linear_rows(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias,
                                         c10::optional<torch::Tensor> A, c10::optional<torch::Tensor> B, double s) {
  if (!f32_cpu(x) || !f32_cpu(W) || W.dim() != 2 || x.dim() < 1 || !x.is_contiguous()) return c10::nullopt;
  const int64_t o = W.size(0), k = W.size(1);
  if (o < 1 || k < 1 || x.size(-1) != k) return c10::nullopt;
  const int64_t n = x.numel() / k;
  if (n < 1 || n > 16) return c10::nullopt;
  const bool rowmajor = W.stride(1) == 1 && W.stride(0) >= k;       // (o, k)
  const bool transposed = !rowmajor && W.stride(0) == 1 && W.stride(1) >= o;  // (k, o) storage
  if (!rowmajor && !transposed) return c10::nullopt;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    if (!f32_cpu(b) || b.dim() != 1 || b.size(0) != o || !b.is_contiguous()) return c10::nullopt;
    bp = b.data_ptr<float>();
  }
  const bool lora = A.has_value() && A->defined();
  if (lora != (B.has_value() && B->defined())) return c10::nullopt;
  if (lora && !low_rank_ok(*A, *B, k, o)) return c10::nullopt;
  auto sizes = x.sizes().vec();
  sizes.back() = o;
  auto out = torch::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = W.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // t (n, r) = s x A^T first (small), then each task adds its outputs' share B t after the base
  const int64_t r = lora ? A->size(0) : 0;
  std::vector<float> t((size_t)(n * r));
  for (int64_t j = 0; j < n && lora; ++j)
    matvec(A->data_ptr<float>(), r, k, xp + j * k, t.data() + j * r, (float)s, false);
  const float* bm = lora ? B->data_ptr<float>() : nullptr;
  auto add_bt = [&](int64_t c0, int64_t c1, int64_t j) {  // out_j[c0:c1] += B[c0:c1] t_j
    matvec(bm + c0 * r, c1 - c0, r, t.data() + j * r, op + j * o + c0, 1.f, true);
  };
  const int64_t blocks = (o + 7) / 8;  // eight outputs per task unit, >= ~64k FMAs per task
  if (transposed) {
    // contiguous row ranges of the stored (k, o) weight per thread, partial sums added at the end
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k * o * n / 65536));
    if (parts == 1) {
      axpy_rows(wp, W.stride(1), 0, k, xp, k, n, bp, op, o);
    } else {
      std::vector<float> part((size_t)(parts - 1) * n * o);
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          axpy_rows(wp, W.stride(1), k * p / parts, k * (p + 1) / parts, xp, k, n, p ? nullptr : bp,
                    p ? part.data() + (p - 1) * n * o : op, o);
      });
      for (int64_t p = 1; p < parts; ++p)
        for (int64_t c = 0; c < n * o; ++c) op[c] += part[(p - 1) * n * o + c];
    }
    if (lora)
      at::parallel_for(0, blocks, std::max<int64_t>(1, 65536 / (8 * r * n)), [&](int64_t b0, int64_t b1) {
        const int64_t c0 = b0 * 8, c1 = std::min(o, b1 * 8);
        for (int64_t j = 0; j < n; ++j) add_bt(c0, c1, j);
      });
  } else {
    at::parallel_for(0, blocks, std::max<int64_t>(1, 65536 / (8 * (k + r) * n)), [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * 8, c1 = std::min(o, b1 * 8);
      for (int64_t j = 0; j < n; ++j) {  // the task's rows of W stay in cache for the next x row
        float* y = op + j * o + c0;
        matvec(wp + c0 * W.stride(0), c1 - c0, k, xp + j * k, y, 1.f, false, W.stride(0));
        if (bp) for (int64_t c = c0; c < c1; ++c) op[j * o + c] += bp[c];
        if (lora) add_bt(c0, c1, j);
      }
    });
  }
  return out;
}

// ---- training's skinny products (rank r much smaller than the widths), float32 ----------------
static bool f32_rows(const torch::Tensor& t) {  // 2-d float32 CPU, unit column stride (rows may be strided)
  return f32_cpu(t) && t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1);
}
// X (N, k) M (r, k)^T -> (N, r), a matrix-vector product per row; None: not handled
c10::optional<torch::Tensor> rows_mm_t(torch::Tensor X, torch::Tensor M) {
  if (!f32_rows(X) || !f32_rows(M) || !M.is_contiguous() || M.size(1) != X.size(1) || M.size(0) < 1 ||
      M.size(0) > 1024 || X.size(1) < 1) return c10::nullopt;
  const int64_t N = X.size(0), k = X.size(1), r = M.size(0), ld = X.stride(0);
  auto out = torch::empty({N, r}, X.options());
  const float* xp = X.data_ptr<float>();
  const float* mp = M.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 32768 / (k * r) + 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) matvec(mp, r, k, xp + i * ld, op + i * r, 1.f, false);
  });
  return out;
}
#ifdef __AVX2__
// acc (o, 8 R8) += G[i0:i1]^T T[i0:i1]: CB columns of G at a time, their CB x R8 accumulators in
// registers over the rows (one broadcast and R8 FMAs per element of G)
template <int R8, int CB>
static void outer_rows(const float* G, int64_t ld, const float* T, int64_t i0, int64_t i1, int64_t o, float* acc) {
  constexpr int r = 8 * R8;
  int64_t c = 0;
  for (; c + CB <= o; c += CB) {
    __m256 a[CB][R8];
    for (int u = 0; u < CB; ++u) for (int v = 0; v < R8; ++v) a[u][v] = _mm256_setzero_ps();
    for (int64_t i = i0; i < i1; ++i) {
      __m256 t[R8];
      for (int v = 0; v < R8; ++v) t[v] = _mm256_loadu_ps(T + i * r + 8 * v);
      const float* g = G + i * ld + c;
      for (int u = 0; u < CB; ++u) {
        const __m256 gb = _mm256_broadcast_ss(g + u);
        for (int v = 0; v < R8; ++v) a[u][v] = _mm256_fmadd_ps(gb, t[v], a[u][v]);
      }
    }
    for (int u = 0; u < CB; ++u)
      for (int v = 0; v < R8; ++v) {
        float* p = acc + (c + u) * r + 8 * v;
        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), a[u][v]));
      }
  }
  for (; c < o; ++c)  // the last o % CB columns
    for (int64_t i = i0; i < i1; ++i) {
      const __m256 gb = _mm256_broadcast_ss(G + i * ld + c);
      for (int v = 0; v < R8; ++v) {
        float* p = acc + c * r + 8 * v;
        _mm256_storeu_ps(p, _mm256_fmadd_ps(gb, _mm256_loadu_ps(T + i * r + 8 * v), _mm256_loadu_ps(p)));
      }
    }
}
template <int R8, int CB>
static void outer_all(const float* G, int64_t ld, const float* T, int64_t N, int64_t o, float* part, int64_t chunks) {
  // 16 rows per sweep of the column blocks: rows of a 768-float stride share 4 L1 sets, and 16 of
  // them still fit (64 rows did not: 3x slower)
  constexpr int64_t ROWS = 16;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      float* acc = part + ch * o * 8 * R8;
      const int64_t e = N * (ch + 1) / chunks;
      for (int64_t i = N * ch / chunks; i < e; i += ROWS)
        outer_rows<R8, CB>(G, ld, T, i, std::min(i + ROWS, e), o, acc);
    }
  });
}
#endif
// G (N, o)^T T (N, r) -> (o, r) for r in {8, 16, 32}; None: not handled
c10::optional<torch::Tensor> rows_t_mm(torch::Tensor G, torch::Tensor T) {
#ifdef __AVX2__
  if (!f32_rows(G) || !f32_rows(T) || !T.is_contiguous() || T.size(0) != G.size(0) || G.size(1) < 1)
    return c10::nullopt;
  const int64_t N = G.size(0), o = G.size(1), r = T.size(1), ld = G.stride(0);
  if (r != 8 && r != 16 && r != 32) return c10::nullopt;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 256));
  auto part = torch::zeros({chunks, o, r}, G.options());  // one accumulator per chunk of rows
  float* pp = part.data_ptr<float>();
  const float* gp = G.data_ptr<float>();
  const float* tp = T.data_ptr<float>();
  if (r == 8) outer_all<1, 12>(gp, ld, tp, N, o, pp, chunks);
  else if (r == 16) outer_all<2, 6>(gp, ld, tp, N, o, pp, chunks);
  else outer_all<4, 3>(gp, ld, tp, N, o, pp, chunks);
  return chunks == 1 ? part[0] : part.sum(0);
#else
  return c10::nullopt;
#endif
}
