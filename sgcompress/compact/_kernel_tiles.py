"""C++ register tiles of the ``sgcompress::gconv`` kernel (part of :data:`._kernel_src.KERNEL_SOURCE`).

The innermost code, which knows nothing of threads, batches or layouts: an AVX-512 tile of 8
(or 4) filters x 32 or 48 pixels over rows read in place (any taps; the "same"-padding masks;
prefetch of the rows' next lines), the same over a packed 1x1 panel, the store maps that
drop row-wrap lanes and split a vector across two samples, and the plain C++ tile used
without AVX-512. The schedules that call them are in :mod:`._kernel_src`.
"""

TILES_SOURCE = r"""
namespace {
constexpr int64_t kR = 8;    // filters per tile (packed width of the weights)
constexpr int64_t kPT = 48;  // pixels per register tile of the plain C++ loops (no AVX-512)

#if defined(__AVX512F__)
inline __mmask16 tail_mask(int64_t rem) {
  return rem >= 16 ? (__mmask16)0xFFFF : (rem <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem) - 1u));
}

// Where the 16 lanes of register vector v (pixels 16*v ...) go, one table per call shared by
// all filters. ``bits`` marks the lanes that are outputs (inside the plane, not a row-wrap
// column) and ``first`` the output index of the first of them: the marked lanes are
// consecutive outputs, so they are compressed together and stored at ``first``. A packed
// 1x1 panel runs over several samples' planes back to back, so its vectors can hold a second
// run, the next sample's first lanes: ``bits2``/``first2`` (null for a single plane). The
// ``first`` values include the sample's offset in the output; lanes at or past ``Qlim`` (the
// end of the pixels computed) are never stored.
struct StoreMap {
  const uint32_t* bits;
  const int64_t* first;
  const uint32_t* bits2;
  const int64_t* first2;
};

inline void store_run(float* o, __m512 a, uint32_t bits) {
  if (bits == 0xFFFFu) _mm512_storeu_ps(o, a);
  else if (bits) _mm512_mask_storeu_ps(o, tail_mask(__builtin_popcount(bits)), _mm512_maskz_compress_ps((__mmask16)bits, a));
}

inline void store_vec(float* orow, __m512 a, int64_t v, int64_t Qlim, const StoreMap& sm) {
  uint32_t b1 = sm.bits[v], b2 = sm.bits2 ? sm.bits2[v] : 0u;
  if (16 * v + 16 > Qlim) {
    const uint32_t lim = tail_mask(Qlim - 16 * v);
    b1 &= lim;
    b2 &= lim;
  }
  store_run(orow + sm.first[v], a, b1);
  if (b2) store_run(orow + sm.first2[v], a, b2);
}

#define SG_Z(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = _mm512_setzero_ps(), a##r##2 = _mm512_setzero_ps();
#define SG_F(r) { const __m512 wb = _mm512_set1_ps(w[r]); \
    a##r##0 = _mm512_fmadd_ps(wb, x0, a##r##0); a##r##1 = _mm512_fmadd_ps(wb, x1, a##r##1); \
    if (NV > 2) a##r##2 = _mm512_fmadd_ps(wb, x2, a##r##2); }
#define SG_S(r) if (R > r) { const int64_t f = fo[r]; if (f >= 0) { \
    const __m512 b = _mm512_set1_ps(bp ? bp[f] : 0.f); float* orow = op + f * plane_out; \
    store_vec(orow, _mm512_add_ps(a##r##0, b), v0, Qmax, sm); \
    store_vec(orow, _mm512_add_ps(a##r##1, b), v0 + 1, Qmax, sm); \
    if (NV > 2) store_vec(orow, _mm512_add_ps(a##r##2, b), v0 + 2, Qmax, sm); } }
#define SG_STEP_M(xs, k0, k1, k2) { \
    const __m512 x0 = _mm512_maskz_loadu_ps(k0, (xs)); \
    const __m512 x1 = _mm512_maskz_loadu_ps(k1, (xs) + 16); \
    const __m512 x2 = NV > 2 ? _mm512_maskz_loadu_ps(k2, (xs) + 32) : _mm512_setzero_ps(); \
    SG_F(0) SG_F(1) SG_F(2) SG_F(3) \
    if (R > 4) { SG_F(4) SG_F(5) SG_F(6) SG_F(7) } }
#define SG_STEP(xs) SG_STEP_M(xs, m0, m1, m2)

// the NV cache lines of one register tile's pixels of one row, on their way to the cache
template <int NV>
inline void prefetch_block(const float* p) {
  __builtin_prefetch(p, 0, 3);
  __builtin_prefetch(p + 16, 0, 3);
  if (NV > 2) __builtin_prefetch(p + 32, 0, 3);
}

// One tile of R (8 or 4) filters over pixels [q_begin, q_end), 16*NV pixels per register tile.
// MT: the rows are unpadded planes read in place, and tm holds, per register tile, tap and
// vector, the lanes whose tap lies inside the plane (the others load zero: the padding).
// Each multiply step prefetches its row's lines two register tiles ahead (at the leading tap):
// the gathered rows lie at uneven strides that no hardware prefetcher follows, and when the
// two threads run on different dies half of each layer's input is in the other die's cache.
template <int R, int NV, bool MT>
void tile_avx512(const float* const* rows, int64_t K, const float* wt, const int64_t* tp, int64_t KK,
                 const int64_t* fo, const float* bp, float* op, int64_t plane_out,
                 int64_t q_begin, int64_t q_end, int64_t Qmax, int64_t qoff, const StoreMap& sm,
                 const __mmask16* tm) {
  for (int64_t q0 = q_begin; q0 < q_end; q0 += 16 * NV) {
    const int64_t v0 = q0 / 16;
    const __mmask16 m0 = tail_mask(Qmax - q0), m1 = tail_mask(Qmax - q0 - 16), m2 = tail_mask(Qmax - q0 - 32);
    SG_Z(0) SG_Z(1) SG_Z(2) SG_Z(3) SG_Z(4) SG_Z(5) SG_Z(6) SG_Z(7)
    const float* w = wt;
    const int64_t pfo = 32 * NV + tp[KK - 1] - qoff;
    const bool pfy = q0 + 32 * NV < q_end;
    if (KK == 1) {
      for (int64_t k = 0; k < K; ++k, w += kR) {
        if (pfy) prefetch_block<NV>(rows[k] + q0 + pfo);
        SG_STEP(rows[k] + (q0 - qoff))
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const float* xr = rows[k] + (q0 - qoff);
        if (pfy) prefetch_block<NV>(rows[k] + q0 + pfo);
        if (MT) {
          const __mmask16* mb = tm + (v0 / NV) * KK * NV;
          for (int64_t a = 0; a < KK; ++a, w += kR, mb += NV) SG_STEP_M(xr + tp[a], mb[0], mb[1], NV > 2 ? mb[2] : 0)
        } else {
          for (int64_t a = 0; a < KK; ++a, w += kR) SG_STEP(xr + tp[a])
        }
      }
    }
    SG_S(0) SG_S(1) SG_S(2) SG_S(3) SG_S(4) SG_S(5) SG_S(6) SG_S(7)
  }
}

// One tile of R filters of a 1x1 layer over nb register blocks of 16*NV panel pixels, the
// first at q0. A block holds its rows back to back (16*NV floats each, zero past the end of
// the pixels), the blocks bstride floats apart from xb; the tile's row k is at ko[k] in a block.
template <int R, int NV>
void tile_packed_avx512(const float* xb, int64_t nb, int64_t bstride, const int64_t* ko, int64_t K,
                        const float* wt, const int64_t* fo, const float* bp, float* op, int64_t plane_out,
                        int64_t q0, int64_t Qmax, const StoreMap& sm, const float*& pf, const float* pf_end) {
  for (int64_t blk = 0; blk < nb; ++blk, q0 += 16 * NV, xb += bstride) {
    const int64_t v0 = q0 / 16;
    SG_Z(0) SG_Z(1) SG_Z(2) SG_Z(3) SG_Z(4) SG_Z(5) SG_Z(6) SG_Z(7)
    const float* w = wt;
    for (int64_t k = 0; k < K; ++k, w += kR) {
      if (pf < pf_end) {  // one line of the next samples' input per step, on its way to the cache
        __builtin_prefetch(pf, 0, 1);
        pf += 16;
      }
      const float* x = xb + ko[k];
      const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
      const __m512 x2 = NV > 2 ? _mm512_loadu_ps(x + 32) : _mm512_setzero_ps();
      SG_F(0) SG_F(1) SG_F(2) SG_F(3)
      if (R > 4) { SG_F(4) SG_F(5) SG_F(6) SG_F(7) }
    }
    SG_S(0) SG_S(1) SG_S(2) SG_S(3) SG_S(4) SG_S(5) SG_S(6) SG_S(7)
  }
}
#endif

// Without AVX-512, a register tile is kPT pixels of R filters in a plain array: acc[r][l] +=
// w[r] * xs[l] for one input row (one tap), and the bias-added store through dst(f, l).
inline void fma_rows(float (&acc)[kR][kPT], int64_t R, const float* w, const float* xs, int64_t n) {
  for (int64_t r = 0; r < R; ++r) {
    const float wv = w[r];
    for (int64_t l = 0; l < n; ++l) acc[r][l] += wv * xs[l];
  }
}

template <typename Dst>
inline void store_rows(const float (&acc)[kR][kPT], int64_t R, const int64_t* fo, const float* bp, int64_t n,
                       Dst dst) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t f = fo[r];
    if (f < 0) continue;
    const float b = bp ? bp[f] : 0.f;
    for (int64_t l = 0; l < n; ++l) {
      float* o = dst(f, l);
      if (o) *o = acc[r][l] + b;
    }
  }
}

// R filters over pixels [q_begin, q_end) (grid pixel q of row k is rows[k][q - qoff]), kPT at a
// time; the output of filter f at pixel q0 + l goes to dst(f, q0 + l) (null: not an output).
template <typename Dst>
void tile_generic(const float* const* rows, int64_t K, const float* w, const int64_t* tp, int64_t KK,
                  const int64_t* fo, int64_t R, const float* bp, int64_t q_begin, int64_t q_end, int64_t qoff,
                  Dst dst) {
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kPT) {
    const int64_t n = std::min<int64_t>(kPT, q_end - q0);
    float acc[kR][kPT] = {};
    const float* wk = w;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t a = 0; a < KK; ++a, wk += kR) fma_rows(acc, R, wk, rows[k] + (q0 - qoff) + tp[a], n);
    store_rows(acc, R, fo, bp, n, [&](int64_t f, int64_t l) { return dst(f, q0 + l); });
  }
}
}  // namespace
"""
