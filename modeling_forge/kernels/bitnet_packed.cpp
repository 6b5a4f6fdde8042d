// BitLinear forward straight from 2-bit ternary weights (the "packed" kernel of modeling_forge/bitnet.py), and the
// tied LM head of a packed model read from its 8- or 4-bit embedding codes.
//
// Built on first use by torch.utils.cpp_extension.load (bitnet.py, `load_packed_kernel`) and registered as
// torch.ops.forge_bitnet.*. `bitlinear` computes exactly what bitnet.py's `bitlinear_product` computes, bit for bit:
//   x_scale = (1 / max(amax|x|, eps)) * qmax          (torch's `qmax / t` is `t.reciprocal() * qmax`)
//   x_int   = nearbyint(x * x_scale)                  (torch.round: round half to even)
//   acc     = sum_k x_int * w_int                     (exact in int32)
//   y       = float(acc) * (w_scale / x_scale) + bias (the same fp32 operations in the same order; built with
//                                                      -ffp-contract=off so no FMA changes a rounding)
//
// Weight layout ("lanes", made once per load by bitnet.py `lane_pack`): codes c = w + 1 in {0, 1, 2}, rows padded to
// a multiple of 16 and columns to a multiple of 4 (code 1 = weight 0). Per tile of 16 rows, each group of 4 columns
// is 16 bytes; byte b holds, in bits 2L..2L+1 (L = 0..3), row 4L + b / 4 and column b % 4 of that tile and group.
// One 16-byte load broadcast to the four 128-bit lanes of a zmm register and shifted right by 0/2/4/6 per lane gives
// the 64 codes as 16 rows x 4 columns, the VNNI operand layout: one VPDPBUSD with the token's 4 int8 activations
// broadcast adds 4 products into each of 16 row accumulators (unsigned codes x signed activations), so no horizontal
// sums are needed. Since sum (w + 1) x = sum w x + sum x, the activation row sum is subtracted at the end. This is
// bitnet.cpp's I2_S idea (2-bit weights decoded in registers, integer dot products); AVX2 uses VPMADDUBSW + VPMADDWD.
// Hand-written because no kept library multiplies transformers' 2-bit BitNet layout without unpacking it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;   // weight rows per tile (one zmm of int32 accumulators)
constexpr int64_t kGroupCols = 4;   // columns per group (one VPDPBUSD lane)
constexpr int64_t kGroupBytes = 16;  // bytes per tile per group
constexpr int kRows = 4;            // LM head: vocabulary rows per tile

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2")) {
    return kAvx2;
  }
  return kScalar;
}

inline int32_t load4(const int8_t* p) {  // 4 activations as one int32 (for a broadcast)
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// What every tile computes: for R tiles of 16 rows starting at the given weights and NT tokens, the integer sums
// acc[n][16 g + i] = sum_k code(row 16 g + i, k) * x[n][k], then y = float(acc - row_sum[n]) * out_scale[n] (+ bias),
// stored for the `rows` valid rows. ldw: bytes per tile; J: column groups; ldx: padded activation row length.
struct TileArgs {
  const int8_t* x;
  int64_t ldx;
  const uint8_t* w;
  int64_t ldw;
  int64_t J;
  const int32_t* row_sum;
  const float* out_scale;
  const float* bias;  // at the tile's first row, or null
  float* out;         // at (first token, first row)
  int64_t ldo;
  int rows;
};

// The scalar epilogue (AVX2 and scalar paths): the reference's fp32 mul, then add.
inline void finish_scalar(const TileArgs& a, int nt, int R, const int32_t* acc) {
  for (int n = 0; n < nt; ++n) {
    for (int i = 0; i < std::min<int>(a.rows, 16 * R); ++i) {
      const float y = static_cast<float>(acc[n * 16 * R + i] - a.row_sum[n]) * a.out_scale[n];
      a.out[n * a.ldo + i] = a.bias ? y + a.bias[i] : y;
    }
  }
}

template <int R, int NT>
void tile_scalar(const TileArgs& a) {
  int32_t acc[NT * 16 * R] = {};
  for (int g = 0; g < R; ++g) {
    for (int64_t j = 0; j < a.J; ++j) {
      const uint8_t* bytes = a.w + g * a.ldw + j * kGroupBytes;
      for (int L = 0; L < 4; ++L) {
        for (int b = 0; b < 16; ++b) {
          const int32_t code = (bytes[b] >> (2 * L)) & 3;
          const int row = 16 * g + 4 * L + b / 4;
          for (int n = 0; n < NT; ++n) acc[n * 16 * R + row] += code * a.x[n * a.ldx + 4 * j + b % 4];
        }
      }
    }
  }
  finish_scalar(a, NT, R, acc);
}

template <int R, int NT>
__attribute__((target("avx2,fma"))) void tile_avx2(const TileArgs& a) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i shift_lo = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);  // rows 0..3 | 4..7
  const __m256i shift_hi = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);  // rows 8..11 | 12..15
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i sums[R][NT][2];
  for (int g = 0; g < R; ++g)
    for (int n = 0; n < NT; ++n) sums[g][n][0] = sums[g][n][1] = _mm256_setzero_si256();
  for (int64_t j = 0; j < a.J; ++j) {
    for (int g = 0; g < R; ++g) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.w + g * a.ldw + j * kGroupBytes));
      const __m256i both = _mm256_broadcastsi128_si256(bytes);
      const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(both, shift_lo), mask);
      const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(both, shift_hi), mask);
      for (int n = 0; n < NT; ++n) {
        const __m256i xb = _mm256_set1_epi32(load4(a.x + n * a.ldx + 4 * j));
        // codes <= 2, |x| <= 127: each 16-bit pair sum is at most 508 (no saturation)
        sums[g][n][0] = _mm256_add_epi32(sums[g][n][0], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xb), ones));
        sums[g][n][1] = _mm256_add_epi32(sums[g][n][1], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xb), ones));
      }
    }
  }
  alignas(32) int32_t acc[NT * 16 * R];
  for (int n = 0; n < NT; ++n) {
    for (int g = 0; g < R; ++g) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(acc + n * 16 * R + 16 * g), sums[g][n][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(acc + n * 16 * R + 16 * g + 8), sums[g][n][1]);
    }
  }
  finish_scalar(a, NT, R, acc);
}

template <int R, int NT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void tile_avx512(const TileArgs& a) {
  const __m512i mask = _mm512_set1_epi8(3);
  // 16-bit shift counts per 128-bit lane: 0, 2, 4, 6 (lane L holds rows 4L .. 4L + 3)
  const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 0x00020002, 0x00020002, 0x00020002, 0x00020002, 0x00040004,
                                          0x00040004, 0x00040004, 0x00040004, 0x00060006, 0x00060006, 0x00060006,
                                          0x00060006);
  __m512i sums[R][NT];
  for (int g = 0; g < R; ++g)
    for (int n = 0; n < NT; ++n) sums[g][n] = _mm512_setzero_si512();
  for (int64_t j = 0; j < a.J; ++j) {
    __m512i codes[R];
    for (int g = 0; g < R; ++g) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.w + g * a.ldw + j * kGroupBytes));
      codes[g] = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(bytes), shift), mask);
    }
    for (int n = 0; n < NT; ++n) {
      const __m512i xb = _mm512_set1_epi32(load4(a.x + n * a.ldx + 4 * j));
      for (int g = 0; g < R; ++g) sums[g][n] = _mm512_dpbusd_epi32(sums[g][n], codes[g], xb);
    }
  }
  for (int g = 0; g < R; ++g) {
    const int valid = std::min(16, a.rows - 16 * g);
    if (valid <= 0) break;
    const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + 16 * g) : _mm512_setzero_ps();
    for (int n = 0; n < NT; ++n) {
      const __m512i v = _mm512_sub_epi32(sums[g][n], _mm512_set1_epi32(a.row_sum[n]));
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(a.out_scale[n]));
      if (a.bias) y = _mm512_add_ps(y, bias);
      _mm512_mask_storeu_ps(a.out + n * a.ldo + 16 * g, m, y);
    }
  }
}

using TileFn = void (*)(const TileArgs&);

// Tiles: one token (decoding) takes 4 row tiles at a time (4 independent accumulators); more tokens take 2 row tiles
// x up to 6 tokens (AVX2: 1 x 4, it has half the registers).
constexpr int kMaxTokens = 6;

#define FORGE_TILE_TABLE(NAME)                                                                                    \
  TileFn NAME##_fn(int R, int nt) {                                                                                \
    static const TileFn one[4] = {NAME<1, 1>, NAME<2, 1>, NAME<3, 1>, NAME<4, 1>};                                 \
    static const TileFn many[2][kMaxTokens] = {                                                                    \
        {NAME<1, 1>, NAME<1, 2>, NAME<1, 3>, NAME<1, 4>, NAME<1, 5>, NAME<1, 6>},                                 \
        {NAME<2, 1>, NAME<2, 2>, NAME<2, 3>, NAME<2, 4>, NAME<2, 5>, NAME<2, 6>}};                                \
    return nt == 1 ? one[R - 1] : many[R - 1][nt - 1];                                                             \
  }

FORGE_TILE_TABLE(tile_scalar)
FORGE_TILE_TABLE(tile_avx2)
FORGE_TILE_TABLE(tile_avx512)

TileFn tile_fn(Isa isa, int R, int nt) {
  return isa == kAvx512 ? tile_avx512_fn(R, nt) : isa == kAvx2 ? tile_avx2_fn(R, nt) : tile_scalar_fn(R, nt);
}

// Per-token quantization of one row: returns sum of the codes; writes codes to q, x_scale to *scale_out.
// amax is exact in any order; the rounding is round-half-even like torch.round (ROUNDPS / nearbyint).
int32_t quantize_row_scalar(const float* row, int64_t K, float eps, float qmax, int8_t* q, float* scale_out) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
  const float x_scale = (1.0f / std::max(amax, eps)) * qmax;
  int32_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(row[k] * x_scale));
    q[k] = static_cast<int8_t>(v);
    total += v;
  }
  *scale_out = x_scale;
  return total;
}

__attribute__((target("avx2,fma"))) int32_t quantize_row_avx2(const float* row, int64_t K, float eps, float qmax,
                                                               int8_t* q, float* scale_out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
  const float x_scale = (1.0f / std::max(amax, eps)) * qmax;
  const __m256 vs = _mm256_set1_ps(x_scale);
  __m256i vsum = _mm256_setzero_si256();
  alignas(32) int32_t codes[8];
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + k), vs),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(r);
    vsum = _mm256_add_epi32(vsum, v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes), v);
    for (int i = 0; i < 8; ++i) q[k + i] = static_cast<int8_t>(codes[i]);
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(codes), vsum);
  int32_t total = 0;
  for (int32_t v : codes) total += v;
  for (; k < K; ++k) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(row[k] * x_scale));
    q[k] = static_cast<int8_t>(v);
    total += v;
  }
  *scale_out = x_scale;
  return total;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) int32_t quantize_row_avx512(const float* row, int64_t K, float eps,
                                                                        float qmax, int8_t* q, float* scale_out) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, row + k)));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const float x_scale = (1.0f / std::max(amax, eps)) * qmax;
  const __m512 vs = _mm512_set1_ps(x_scale);
  __m512i vsum = _mm512_setzero_si512();
  for (k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + k), vs),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i v = _mm512_cvtps_epi32(r);
    vsum = _mm512_add_epi32(vsum, v);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(v));
  }
  *scale_out = x_scale;
  return _mm512_reduce_add_epi32(vsum);
}

using QuantFn = int32_t (*)(const float*, int64_t, float, float, int8_t*, float*);

QuantFn quant_fn(Isa isa) {
  return isa == kAvx512 ? quantize_row_avx512 : isa == kAvx2 ? quantize_row_avx2 : quantize_row_scalar;
}

// x: (N, K) fp32; lanes: (ceil(M / 16), ceil(K / 4) * 16) uint8; w_scale: (1,) fp32; bias: (M,) or none.
at::Tensor bitlinear(const at::Tensor& x, const at::Tensor& lanes, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, int64_t out_features, int64_t qmax, double eps,
                     int64_t isa_request) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "forge_bitnet.bitlinear: x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(lanes.dim() == 2 && lanes.scalar_type() == at::kByte && lanes.is_contiguous(),
              "forge_bitnet.bitlinear: lanes must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(qmax >= 1 && qmax <= 127, "forge_bitnet.bitlinear: qmax must be in [1, 127]");
  const int64_t N = x.size(0), K = x.size(1), M = out_features;
  const int64_t J = (K + kGroupCols - 1) / kGroupCols, Kp = J * kGroupCols, ldw = J * kGroupBytes;
  const int64_t T = (M + kTileRows - 1) / kTileRows;
  TORCH_CHECK(lanes.size(0) == T && lanes.size(1) == ldw, "forge_bitnet.bitlinear: lanes has shape ", lanes.sizes(),
              ", expected (", T, ", ", ldw, ") for ", M, " x ", K);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == 1, "forge_bitnet.bitlinear: w_scale must be "
              "one fp32 value");
  const float scale_w = *w_scale.data_ptr<float>();
  const float* bias_ptr = nullptr;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.numel() == M, "forge_bitnet.bitlinear: bias has ", bias_f.numel(), " values, not ", M);
    bias_ptr = bias_f.data_ptr<float>();
  }
  const Isa isa = isa_request < 0 ? best_isa() : std::min(static_cast<Isa>(isa_request), best_isa());

  // 1. Per-token absmax quantization (the same fp32 operations as bitnet.py `quantize_activations`).
  // Scratch reused across calls (decoding calls this ~100 times per token; fresh tensors cost more than the math).
  // The lambdas below run on other threads, so they must use these pointers, never the thread_local names.
  thread_local std::vector<int8_t> xq_buffer;
  thread_local std::vector<float> scale_buffer;
  thread_local std::vector<int32_t> sum_buffer;
  xq_buffer.resize(N * Kp);
  scale_buffer.resize(N);
  sum_buffer.resize(N);
  int8_t* qp = xq_buffer.data();
  float* out_scale = scale_buffer.data();
  int32_t* row_sum = sum_buffer.data();
  const float* xp = x.data_ptr<float>();
  const float eps_f = static_cast<float>(eps), qmax_f = static_cast<float>(qmax);
  const QuantFn quantize = quant_fn(isa);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float x_scale;
      row_sum[n] = quantize(xp + n * K, K, eps_f, qmax_f, qp + n * Kp, &x_scale);
      std::fill(qp + n * Kp + K, qp + (n + 1) * Kp, int8_t{0});  // padding columns: activation 0
      out_scale[n] = scale_w / x_scale;
    }
  });

  // 2. Integer products and the output scaling, in tiles of 16-row groups x tokens; threads split the rows.
  at::Tensor out = at::empty({N, M}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = lanes.data_ptr<uint8_t>();
  const int group = N == 1 ? 4 : (isa == kAvx2 ? 1 : 2);  // row tiles per work item
  const int max_tokens = isa == kAvx2 ? 4 : kMaxTokens;
  const int64_t items = (T + group - 1) / group;
  // Enough work per task to pay for waking a thread: ~64k multiply-adds.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, group * kTileRows * Kp * N));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = item * group;
      const int R = static_cast<int>(std::min<int64_t>(group, T - t0));
      const int rows = static_cast<int>(std::min<int64_t>(R * kTileRows, M - t0 * kTileRows));
      for (int64_t n0 = 0; n0 < N; n0 += max_tokens) {
        const int nt = static_cast<int>(std::min<int64_t>(max_tokens, N - n0));
        const TileArgs args{qp + n0 * Kp,  Kp, wp + t0 * ldw, ldw, J, row_sum + n0, out_scale + n0,
                            bias_ptr ? bias_ptr + t0 * kTileRows : nullptr, op + n0 * M + t0 * kTileRows, M, rows};
        tile_fn(isa, R, nt)(args);
      }
    }
  });
  return out;
}

// ---- The tied LM head of a packed model with an 8- or 4-bit embedding, read from its codes -------------------------
// logits[n, v] = sum_k (code[v, k] * scale[v, k / G]) * h[n, k]: code * scale is exactly the fp32 dequantized weight
// (at most 8 + 11 significant bits), so this is F.linear(h, dequantized) up to the order of the fp32 sums, which is
// fixed here (16 lanes over k, then a tree), the same for every batch size. 4 vocabulary rows x up to 4 tokens.

// Tile of 4 vocabulary rows x NT tokens. 8 bits: 16 codes -> fp32 -> times the group scale. 4 bits: 16 bytes = 32
// nibbles; each nibble indexes a 16-entry table (c - 8) * scale of its row and group (one VPERMPS per 16 weights).
template <int BITS, int NT>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void lowbit_tile(const float* x, int64_t D,
                                                                          const uint8_t* codes, int64_t ldc,
                                                                          const at::Half* scales, int64_t groups,
                                                                          int64_t G, int rows, float* out,
                                                                          int64_t ldo) {
  constexpr int64_t kStep = BITS == 8 ? 16 : 32;  // columns per step
  const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m128i nib = _mm_set1_epi8(0x0F);
  const uint8_t* row_codes[kRows];
  for (int r = 0; r < kRows; ++r) row_codes[r] = codes + std::min(r, rows - 1) * ldc;
  __m512 acc[NT][kRows];
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < kRows; ++r) acc[n][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 table[kRows];  // 8 bits: the broadcast scale; 4 bits: (c - 8) * scale for c = 0..15 (exact products)
    for (int r = 0; r < kRows; ++r) {
      const __m512 scale = _mm512_set1_ps(r < rows ? static_cast<float>(scales[r * groups + g]) : 0.f);
      table[r] = BITS == 8 ? scale : _mm512_mul_ps(centred, scale);
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += kStep) {
      if constexpr (BITS == 8) {
        __m512 w[kRows];
        for (int r = 0; r < kRows; ++r) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_codes[r] + k));
          w[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), table[r]);
        }
        for (int n = 0; n < NT; ++n) {
          const __m512 xv = _mm512_loadu_ps(x + n * D + k);
          for (int r = 0; r < kRows; ++r) acc[n][r] = _mm512_fmadd_ps(w[r], xv, acc[n][r]);
        }
      } else {
        __m512 w0[kRows], w1[kRows];
        for (int r = 0; r < kRows; ++r) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_codes[r] + k / 2));
          const __m128i lo = _mm_and_si128(bytes, nib), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
          w0[r] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), table[r]);
          w1[r] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), table[r]);
        }
        for (int n = 0; n < NT; ++n) {
          const __m512 x0 = _mm512_loadu_ps(x + n * D + k), x1 = _mm512_loadu_ps(x + n * D + k + 16);
          for (int r = 0; r < kRows; ++r) acc[n][r] = _mm512_fmadd_ps(w1[r], x1, _mm512_fmadd_ps(w0[r], x0, acc[n][r]));
        }
      }
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < rows; ++r) out[n * ldo + r] = _mm512_reduce_add_ps(acc[n][r]);
}

template <int BITS>
void lowbit_tile_dispatch(int nt, const float* x, int64_t D, const uint8_t* codes, int64_t ldc, const at::Half* scales,
                          int64_t groups, int64_t G, int rows, float* out, int64_t ldo) {
  switch (nt) {
    case 1:
      return lowbit_tile<BITS, 1>(x, D, codes, ldc, scales, groups, G, rows, out, ldo);
    case 2:
      return lowbit_tile<BITS, 2>(x, D, codes, ldc, scales, groups, G, rows, out, ldo);
    case 3:
      return lowbit_tile<BITS, 3>(x, D, codes, ldc, scales, groups, G, rows, out, ldo);
    default:
      return lowbit_tile<BITS, 4>(x, D, codes, ldc, scales, groups, G, rows, out, ldo);
  }
}

// x: (N, D) fp32; codes: (V, D) int8 (8 bits) or (V, D / 2) uint8 nibbles (4 bits, even column low); scales:
// (V, D / G) fp16. Needs AVX-512 and G % 32 == 0 (bitnet.py checks `lowbit_supported` first).
at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                         int64_t group_size) {
  TORCH_CHECK(best_isa() == kAvx512, "forge_bitnet.lowbit_linear needs AVX-512");
  TORCH_CHECK(bits == 8 || bits == 4, "forge_bitnet.lowbit_linear: bits must be 8 or 4");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "forge_bitnet.lowbit_linear: x must be a contiguous 2-D fp32 CPU tensor");
  const int64_t N = x.size(0), D = x.size(1), V = codes.size(0), G = group_size, groups = D / std::max<int64_t>(G, 1);
  TORCH_CHECK(G > 0 && G % 32 == 0 && D % G == 0, "forge_bitnet.lowbit_linear: group size must divide D and be a "
              "multiple of 32");
  TORCH_CHECK(codes.is_contiguous() && codes.size(1) == (bits == 8 ? D : D / 2), "forge_bitnet.lowbit_linear: codes "
              "have shape ", codes.sizes(), " for D = ", D);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.size(0) == V &&
                  scales.size(1) == groups,
              "forge_bitnet.lowbit_linear: scales must be contiguous fp16 (V, D / group_size)");
  at::Tensor out = at::empty({N, V}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const at::Half* sp = scales.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  const int64_t ldc = codes.size(1), row_tiles = (V + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kRows * D * N));
  at::parallel_for(0, row_tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t v0 = t * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, V - v0));
      for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int nt = static_cast<int>(std::min<int64_t>(4, N - n0));
        auto fn = bits == 8 ? lowbit_tile_dispatch<8> : lowbit_tile_dispatch<4>;
        fn(nt, xp + n0 * D, D, cp + v0 * ldc, ldc, sp + v0 * groups, groups, G, rows, op + n0 * V + v0, V);
      }
    }
  });
  return out;
}

std::string isa_name() {
  switch (best_isa()) {
    case kAvx512:
      return "avx512-vnni";
    case kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY(forge_bitnet, m) {
  m.def("bitlinear(Tensor x, Tensor lanes, Tensor w_scale, Tensor? bias, int out_features, int qmax, float eps, "
        "int isa=-1) -> Tensor");
  m.def("lowbit_linear(Tensor x, Tensor codes, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("isa() -> str", &isa_name);
}

TORCH_LIBRARY_IMPL(forge_bitnet, CPU, m) {
  m.impl("bitlinear", &bitlinear);
  m.impl("lowbit_linear", &lowbit_linear);
}
