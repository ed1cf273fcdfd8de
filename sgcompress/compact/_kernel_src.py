"""C++ source of the gather-while-computing kernel (built on first use by :mod:`.kernel`).

One op, ``sgcompress::gconv``: a convolution whose filters come in *tiles* of up to 8
filters that share one list of input channels. The input is NCHW; the output plane is computed
over the flattened zero-padded grid so every kernel tap is a constant offset, and row-wrap
lanes are dropped at the store (through a per-call table of which lanes are outputs). A
stride-1 layer whose output is the size of its input ("same" padding, e.g. 3x3 with padding
1) reads its input in place on the input's own grid: the lanes whose tap falls in the
padding are loaded as zero through a mask per register vector and tap (AVX-512 builds; the
table is built once per geometry and thread). Any other padded or strided layer first stages
each input plane, zero-padded, as its stride_h x stride_w polyphase planes (into a buffer
that the calling thread keeps and reuses), on which the same holds. Input channels are read
through an index list (row indirection) and outputs are written to their original channel
(row indirection), so neither the gather nor the scatter copies the tensor (1x1 layers at
large batch pack a chunk at a time, below). The register tile is 8 (or 4) filters x 32 or 48
pixels, accumulated with AVX-512 FMAs; a plain C++ loop is used when the compiler has no
AVX-512.

Three schedules. With at least two samples per thread, each thread takes whole samples. A
1x1 layer then packs, per pixel chunk, the union of the input rows that its tiles read (a
row kept by several groups is copied once) block by block (one register block of pixels at
a time, its rows back to back), and every tile runs over the chunk's blocks, reading its own
rows of each; a plane under 512 pixels packs several samples side by side, so the blocks
fill (a 7x7 plane alone would leave a quarter of the lanes idle), and the next samples'
input is prefetched while the tiles run. Any other layer stages one sample at a time (the
copy stays in the thread's cache) and runs every tile on it. With fewer samples the whole
batch is staged at once and the (sample, chunk, tile) items are cut into one contiguous
share per thread; a thread that finishes its share takes the others' leftover items one at a
time (tiles differ in cost, and a thread may start late).
"""

from ._kernel_tiles import TILES_SOURCE

KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
""" + TILES_SOURCE + r"""
// Per calling thread, reused across calls: staging a padded / polyphase copy of the input
// in fresh memory each call costs more in page faults than the copy itself at large batch.
std::vector<float>& staging_buffer() {
  thread_local std::vector<float> buf;
  return buf;
}

// Per thread too: the input rows of one pixel chunk, packed (1x1 layers).
std::vector<float>& panel_buffer() {
  thread_local std::vector<float> buf;
  return buf;
}

// Stage planes [0, count) of src (H x W each) into dst: every plane zero-padded and split into
// its sh*sw polyphase planes of Hq x Wr, so every kernel tap becomes a constant offset.
void stage_planes(const float* src, int64_t count, float* dst, int64_t H, int64_t W, int64_t sh, int64_t sw,
                  int64_t ph, int64_t pw, int64_t Hq, int64_t Wr) {
  const int64_t plane_q = Hq * Wr, nph = sh * sw;
  for (int64_t nc = 0; nc < count; ++nc) {
    const float* s = src + nc * H * W;
    float* d = dst + nc * nph * plane_q;
    for (int64_t a = 0; a < sh; ++a) for (int64_t c = 0; c < sw; ++c) {
      float* dp = d + (a * sw + c) * plane_q;
      for (int64_t r = 0; r < Hq; ++r) {
        const int64_t y = r * sh + a - ph;  // row of x
        float* drow = dp + r * Wr;
        if (y < 0 || y >= H) { std::fill(drow, drow + Wr, 0.f); continue; }
        const float* srow = s + y * W;
        if (sw == 1) {  // left pad, the row, right pad
          const int64_t left = std::min(pw, Wr);
          std::fill(drow, drow + left, 0.f);
          const int64_t n = std::min(W, Wr - left);
          std::copy(srow, srow + n, drow + left);
          std::fill(drow + left + n, drow + Wr, 0.f);
        } else {
          for (int64_t q = 0; q < Wr; ++q) {
            const int64_t xx = q * sw + c - pw;
            drow[q] = (xx >= 0 && xx < W) ? srow[xx] : 0.f;
          }
        }
      }
    }
  }
}

// dst[0, n) = src[0, n) for a short run (at most 48 floats: three masked vector moves)
inline void copy_run(const float* src, int64_t n, float* dst) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
  }
#else
  std::copy(src, src + n, dst);
#endif
}

// Pack pixels [qb, qe) of a 1x1 panel into register blocks of BW pixels, bstride floats apart:
// row u of every block is input channel rows[u]. The panel is several samples' planes back to
// back (sample s at xn + s * sample_stride); lanes past qe in the last block are zeroed.
void pack_chunk(const float* xn, int64_t sample_stride, int64_t plane, const int64_t* rows, int64_t U,
                int64_t qb, int64_t qe, int64_t BW, int64_t bstride, float* pnl) {
  const int64_t nb = (qe - qb + BW - 1) / BW, tail = nb * BW - (qe - qb);
  const int64_t smp0 = qb / plane, px0 = qb % plane;
  for (int64_t u = 0; u < U; ++u) {
    if (u + 8 < U) {  // the runs of row u + 8 (each a new stream) on their way to the cache
      const float* ps = xn + rows[u + 8] * plane;
      for (int64_t q = qb, smp = smp0, px = px0; q < qe; px = 0, ++smp) {
        const int64_t n = std::min(plane - px, qe - q);
        const float* a = ps + smp * sample_stride + px;
        for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(a + i, 0, 3);
        __builtin_prefetch(a + n - 1, 0, 3);
        q += n;
      }
    }
    // runs that end at a block's edge or a plane's end, whichever comes first
    const float* src = xn + rows[u] * plane;
    float* dst = pnl + u * BW;
    for (int64_t q = qb, l = 0, smp = smp0, px = px0; q < qe;) {
      const int64_t n = std::min({BW - l, plane - px, qe - q});
      copy_run(src + smp * sample_stride + px, n, dst + l);
      q += n;
      l += n;
      px += n;
      if (l == BW) { l = 0; dst += bstride; }
      if (px == plane) { px = 0; ++smp; }
    }
    if (tail) std::fill(pnl + (nb - 1) * bstride + u * BW + BW - tail, pnl + (nb - 1) * bstride + (u + 1) * BW, 0.f);
  }
}

#if defined(__AVX512F__)
// Per register tile of 16*NV pixels of an H x W output plane that is the input's grid (stride
// 1, "same" padding), per tap and per vector: the lanes whose tap falls inside the input
// plane. Built once per geometry by each calling thread and kept.
const __mmask16* tap_masks(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t dh, int64_t dw, int64_t ph,
                           int64_t pw, int NV) {
  thread_local std::map<std::array<int64_t, 9>, std::vector<__mmask16>> cache;
  const std::array<int64_t, 9> key{H, W, kh, kw, dh, dw, ph, pw, NV};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.data();
  if (cache.size() >= 64) cache.clear();  // many input sizes: start again rather than grow
  const int64_t KK = kh * kw, Q = H * W, nblk = (Q + 16 * NV - 1) / (16 * NV);
  std::vector<__mmask16> m(static_cast<size_t>(nblk * KK * NV), 0);
  for (int64_t q = 0, oy = 0, ox = 0; q < Q; ++q) {
    const int64_t v = q / 16, b = v / NV, j = v % NV;
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t y = oy + i * dh - ph;
      if (y < 0 || y >= H) continue;
      for (int64_t c = 0; c < kw; ++c) {
        const int64_t xx = ox + c * dw - pw;
        if (xx >= 0 && xx < W) m[(b * KK + i * kw + c) * NV + j] |= static_cast<__mmask16>(1u << (q % 16));
      }
    }
    if (++ox == W) { ox = 0; ++oy; }
  }
  return cache.emplace(key, std::move(m)).first->second.data();
}
#endif

// one thread's share of the items of a parallel loop: the next unclaimed item and the end
struct alignas(64) Share {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

float* staged(std::vector<float>& buf, size_t need) {
  if (buf.size() < need) { std::vector<float>().swap(buf); buf.resize(need); }
  return buf.data();
}

at::Tensor sg_gconv(const at::Tensor& x_in, const at::Tensor& wpack, const at::Tensor& tile_out,
                    const at::Tensor& tile_k, const at::Tensor& tile_w, const at::Tensor& tile_r,
                    const at::Tensor& kidx, const at::Tensor& bias, int64_t C_out,
                    int64_t kh, int64_t kw, int64_t dh, int64_t dw, int64_t sh, int64_t sw,
                    int64_t ph, int64_t pw) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat, "sgcompress::gconv: x must be 4-D float32");
  TORCH_CHECK(wpack.scalar_type() == at::kFloat, "sgcompress::gconv: weights must be float32");
  TORCH_CHECK(sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0, "sgcompress::gconv: bad stride or padding");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor wc = wpack.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  TORCH_CHECK(Hp > dh * (kh - 1) && Wp > dw * (kw - 1), "sgcompress::gconv: input smaller than the kernel");
  const int64_t Ho = (Hp - dh * (kh - 1) - 1) / sh + 1, Wo = (Wp - dw * (kw - 1) - 1) / sw + 1;
  // Stride 1 and an output the size of the input ("same" padding), AVX-512: read x in place,
  // every tap a constant offset on the input's own grid, and load the lanes whose tap falls
  // in the padding as zero (masks per register vector and tap). Other padding or stride:
  // stage each zero-padded plane as its sh*sw polyphase planes (one copy into a buffer that
  // the thread keeps), so that every tap is a constant offset on a grid of row width Wr
  // whose pixels are outputs. Neither: read x in place.
#if defined(__AVX512F__)
  const bool masked = sh == 1 && sw == 1 && (ph > 0 || pw > 0) && Ho == H && Wo == W;
#else
  const bool masked = false;
#endif
  const int64_t Hq = (Hp + sh - 1) / sh, Wr = masked ? W : (Wp + sw - 1) / sw;
  const int64_t nph = sh * sw, plane_q = Hq * Wr;
  const bool stage = !masked && (nph > 1 || ph > 0 || pw > 0);
  const float* xp = x.data_ptr<float>();
  std::vector<int64_t> taps_v;
  for (int64_t i = 0; i < kh; ++i) for (int64_t j = 0; j < kw; ++j) {
    const int64_t y = i * dh, xx = j * dw;
    taps_v.push_back(masked ? (y - ph) * W + (xx - pw)
                            : ((y % sh) * sw + (xx % sw)) * plane_q + (y / sh) * Wr + xx / sw);
  }
  const int64_t plane = stage ? nph * plane_q : H * W, plane_out = Ho * Wo;
  const int64_t Qmax = (Ho - 1) * Wr + Wo;
  const int64_t T = tile_out.size(0), KK = kh * kw;
  at::Tensor out = at::empty({N, C_out, Ho, Wo}, x.options());
  if (N == 0 || C_out == 0 || plane_out == 0) return out;
  const float* wp = wc.data_ptr<float>();
  const int64_t* to = tile_out.data_ptr<int64_t>();
  const int64_t* tk = tile_k.data_ptr<int64_t>();
  const int64_t* tw = tile_w.data_ptr<int64_t>();
  const int64_t* tr = tile_r.data_ptr<int64_t>();
  const int64_t* ki = kidx.data_ptr<int64_t>();
  const int64_t* tp = taps_v.data();
  const at::Tensor bc = bias.numel() > 0 ? bias.contiguous() : bias;
  const float* bp = bias.numel() > 0 ? bc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // register tile width: 48 pixels unless that pads the plane noticeably more than 32 does
  const int64_t pad48 = (Qmax + 47) / 48 * 48, pad32 = (Qmax + 31) / 32 * 32;
  const int NV = (pad48 * 100 <= pad32 * 105) ? 3 : 2;
  const int64_t QC = NV == 3 ? 480 : 512;
  const int64_t nchunk = (Qmax + QC - 1) / QC;
#if defined(__AVX512F__)
  const int64_t nvec = (Qmax + 15) / 16 + 3;  // + the lanes a last 48-pixel tile runs past Qmax
  std::vector<uint32_t> vbits(nvec, 0u);
  std::vector<int64_t> vfirst(nvec, 0);
  for (int64_t q = 0, col = 0, o = 0; q < Qmax; ++q) {  // o: output index of grid pixel q
    if (col < Wo) {
      if (!vbits[q / 16]) vfirst[q / 16] = o;
      vbits[q / 16] |= 1u << (q % 16);
      ++o;
    }
    if (++col == Wr) col = 0;
  }
  const StoreMap sm{vbits.data(), vfirst.data(), nullptr, nullptr};
  const __mmask16* tm = masked ? tap_masks(H, W, kh, kw, dh, dw, ph, pw, NV) : nullptr;
#endif
  // chunk c of tile t of sample n, reading the sample's (staged) planes at xn in place
  auto run = [&](const float* xn, int64_t n, int64_t c, int64_t t, std::vector<const float*>& rows) {
    const int64_t k0 = tk[t], K = tk[t + 1] - tk[t];
    rows.resize(std::max<int64_t>(K, 1));
    for (int64_t k = 0; k < K; ++k) rows[k] = xn + ki[k0 + k] * plane;
    const int64_t qb = c * QC, qe = std::min(Qmax, qb + QC);
    float* on = op + n * C_out * plane_out;
#if defined(__AVX512F__)
#define SG_CALL(R_, NV_, MT_) tile_avx512<R_, NV_, MT_>(rows.data(), K, wp + tw[t], tp, KK, to + t * kR, bp, on, \
                                                      plane_out, qb, qe, Qmax, 0, sm, tm)
#define SG_WIDTHS(MT_) if (tr[t] > 4) { if (NV == 3) SG_CALL(8, 3, MT_); else SG_CALL(8, 2, MT_); } \
                        else { if (NV == 3) SG_CALL(4, 3, MT_); else SG_CALL(4, 2, MT_); }
    if (tm) { SG_WIDTHS(true) } else { SG_WIDTHS(false) }
#undef SG_WIDTHS
#undef SG_CALL
#else
    tile_generic(rows.data(), K, wp + tw[t], tp, KK, to + t * kR, tr[t], bp, qb, qe, 0,
                 [&](int64_t f, int64_t q) -> float* {
                   const int64_t ox = q % Wr;  // row-wrap lanes (ox >= Wo) are not outputs
                   return ox < Wo ? on + f * plane_out + (q / Wr) * Wo + ox : nullptr;
                 });
#endif
  };
  const size_t sample_floats = static_cast<size_t>(C * plane);
  const bool pack = KK == 1 && !stage;
  if (N >= 2 * at::get_num_threads() && pack) {
    // 1x1, enough samples for every thread: each thread takes whole samples. Per pixel chunk
    // it packs the rows that any tile reads (their union, each row once: a row kept by
    // several groups is not copied again) into a panel, block by block (a register block of
    // BW pixels: the block's rows back to back), and every tile then runs over the chunk's
    // blocks, reading its own rows of each; a small plane packs FOLD samples side by side so
    // that the blocks fill.
    std::vector<int64_t> uni, upos(C, -1);  // the union's channels, ascending; channel -> row
    for (int64_t i = 0; i < tk[T]; ++i) upos[ki[i]] = 0;
    for (int64_t c = 0; c < C; ++c)
      if (upos[c] == 0) { upos[c] = static_cast<int64_t>(uni.size()); uni.push_back(c); }
    const int64_t U = static_cast<int64_t>(uni.size());
    const int64_t FOLD = (plane >= 16 && plane < 512) ? std::max<int64_t>(1, 1024 / plane) : 1;
    const int64_t Lmax = FOLD * plane;
    const int64_t p48 = (Lmax + 47) / 48 * 48, p32 = (Lmax + 31) / 32 * 32;
    const int PNV = (p48 * 100 <= p32 * 105) ? 3 : 2;
    const int64_t BW = 16 * PNV, bstride = std::max<int64_t>(U, 1) * BW;
    // tile t's row k: at ko[tk[t] + k] floats into a block
    std::vector<int64_t> ko(std::max<int64_t>(tk[T], 1));
    for (int64_t i = 0; i < tk[T]; ++i) ko[i] = upos[ki[i]] * BW;
    // pixel chunk: the packed rows of a chunk stay within about 384 KiB (of a 1 MiB L2)
    const int64_t QP = std::max<int64_t>(BW, std::min<int64_t>((Lmax + BW - 1) / BW * BW,
                                                               98304 / std::max<int64_t>(U, 1) / BW * BW));
    const int64_t sample_out = C_out * plane_out;
#if defined(__AVX512F__)
    const int64_t pvec = (Lmax + BW - 1) / BW * BW / 16;
    std::vector<uint32_t> pb1(pvec, 0u), pb2(pvec, 0u);
    std::vector<int64_t> pf1(pvec, 0), pf2(pvec, 0);
    for (int64_t v = 0; v < pvec; ++v) {
      const int64_t q = 16 * v;
      if (q >= Lmax) break;
      const int64_t smp = q / plane, px = q % plane;
      const int64_t run = std::min<int64_t>({16, plane - px, Lmax - q});  // lanes in sample smp
      pb1[v] = run >= 16 ? 0xFFFFu : (1u << run) - 1u;
      pf1[v] = smp * sample_out + px;
      const int64_t rest = std::min<int64_t>(16, Lmax - q) - run;  // lanes in sample smp + 1
      if (rest > 0) {
        pb2[v] = ((1u << rest) - 1u) << run;
        pf2[v] = (smp + 1) * sample_out;
      }
    }
    const StoreMap pm{pb1.data(), pf1.data(), pb2.data(), pf2.data()};
#endif
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      float* pnl = staged(panel_buffer(), static_cast<size_t>(bstride * (QP / BW)));
#if !defined(__AVX512F__)
      std::vector<const float*> rows;
#endif
      for (int64_t n = begin; n < end; n += FOLD) {
        const int64_t ms = std::min(FOLD, end - n), L = ms * plane;
        // the next samples' input is fetched while these are computed (a stream the tiles pace)
        const float* pf = xp + (n + ms) * C * plane;
        const float* pf_end = xp + std::min(end, n + ms + FOLD) * C * plane;
        float* on = op + n * sample_out;
        const float* xn = xp + n * C * plane;
        for (int64_t qb = 0; qb < L; qb += QP) {
          const int64_t qe = std::min(L, qb + QP), nb = (qe - qb + BW - 1) / BW;
          pack_chunk(xn, C * plane, plane, uni.data(), U, qb, qe, BW, bstride, pnl);
          for (int64_t t = 0; t < T; ++t) {  // every tile over the chunk's blocks, its rows of each
            const int64_t K = tk[t + 1] - tk[t];
            const int64_t* kot = ko.data() + tk[t];
#if defined(__AVX512F__)
#define SG_PCALL(R_, NV_) tile_packed_avx512<R_, NV_>(pnl, nb, bstride, kot, K, wp + tw[t], to + t * kR, bp, on, \
                                                     plane_out, qb, L, pm, pf, pf_end)
            if (tr[t] > 4) { if (PNV == 3) SG_PCALL(8, 3); else SG_PCALL(8, 2); }
            else { if (PNV == 3) SG_PCALL(4, 3); else SG_PCALL(4, 2); }
#undef SG_PCALL
#else
            rows.resize(std::max<int64_t>(K, 1));
            for (int64_t b = 0; b < nb; ++b) {
              const int64_t q0 = qb + b * BW;
              for (int64_t k = 0; k < K; ++k) rows[k] = pnl + b * bstride + kot[k];
              tile_generic(rows.data(), K, wp + tw[t], tp, 1, to + t * kR, tr[t], bp, q0, std::min(qe, q0 + BW), q0,
                           [&](int64_t f, int64_t q) { return on + (q / plane) * sample_out + f * plane_out + q % plane; });
            }
#endif
          }
        }
      }
    });
    return out;
  }
  if (N >= 2 * at::get_num_threads()) {
    // Enough samples for every thread: each thread takes whole samples, stages one at a time
    // into its own buffer (cache-sized, where a whole-batch copy would go out to memory and
    // back) and runs all its tiles from there.
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<const float*> rows;
      float* buf = stage ? staged(staging_buffer(), sample_floats) : nullptr;
      for (int64_t n = begin; n < end; ++n) {
        const float* xn = xp + n * C * H * W;
        if (stage) {
          stage_planes(xn, C, buf, H, W, sh, sw, ph, pw, Hq, Wr);
          xn = buf;
        }
        for (int64_t c = 0; c < nchunk; ++c)
          for (int64_t t = 0; t < T; ++t) run(xn, n, c, t, rows);
      }
    });
    return out;
  }
  // Few samples: stage the whole batch (in parallel), then share out chunks x tiles.
  if (stage) {
    float* dst = staged(staging_buffer(), N * sample_floats);
    at::parallel_for(0, N * C, 8, [&](int64_t b, int64_t e) {
      stage_planes(xp + b * H * W, e - b, dst + b * plane, H, W, sh, sw, ph, pw, Hq, Wr);
    });
    xp = dst;
  }
  // Each thread has a contiguous share of the (sample, chunk, tile) items; one that finishes
  // its share (it woke late, or drew heavier tiles) goes on to take the others' remaining
  // items one at a time, so no thread waits idle while items are left.
  const int64_t items = N * nchunk * T;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::unique_ptr<Share[]> share(new Share[P]);
  for (int64_t p = 0; p < P; ++p) {
    share[p].next.store(p * items / P, std::memory_order_relaxed);
    share[p].end = (p + 1) * items / P;
  }
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows;
    for (int64_t p = begin; p < end; ++p)
      for (int64_t v = 0; v < P; ++v) {  // own share first, then the next threads' leftovers
        Share& s = share[(p + v) % P];
        for (int64_t it; (it = s.next.fetch_add(1, std::memory_order_relaxed)) < s.end;) {
          const int64_t t = it % T, c = (it / T) % nchunk, n = it / (T * nchunk);
          run(xp + n * sample_floats, n, c, t, rows);
        }
      }
  });
  return out;
}

TORCH_LIBRARY_IMPL(sgcompress, CPU, m) { m.impl("gconv", &sg_gconv); }
"""
