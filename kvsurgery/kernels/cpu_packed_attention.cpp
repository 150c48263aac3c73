// Decode attention over the packed (KIVI) region of a quantized store on CPU: the codes are dequantized inside the
// logit and value loops, a vector of slots or channels at a time, so no dequantized copy of the keys or values is
// ever written. Built and loaded by cpu_packed_attention.py, which defines the layout's constants:
//   KV_G  query heads per KV head        KV_D  head dim            KV_L  floats per vector
//   KV_KB, KV_VB  bits of a key / value code (1, 2 or 4), packed low bits first (quant_codes.pack)
//   KV_GK  slots per key group (keys: one scale and lo per channel and group of slots)
//   KV_GV  channels per value group (values: one scale and lo per slot and group of channels)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

constexpr int64_t G = KV_G, D = KV_D, L = KV_L, KB = KV_KB, VB = KV_VB, GK = KV_GK, GV = KV_GV;
constexpr int64_t KP = 8 / KB, KW = D / KP;  // codes per byte, bytes per key
constexpr int64_t VP = 8 / VB, VW = D / VP, VC = VW / L, NGV = D / GV;  // ..., vectors per value plane, groups
static_assert(GK % L == 0 && VW % L == 0, "key groups and value planes must hold whole vectors");

typedef float vf __attribute__((vector_size(4 * L)));
typedef uint8_t vb __attribute__((vector_size(L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));

// Bytes widened to 32-bit lanes once (one instruction), then each code is a shift and a mask in those lanes: the
// 8-bit lanes themselves convert to float one lane at a time, and AVX2 has no 8-bit shift.
static inline vi widened(const uint8_t* bytes) {
    vb b;
    std::memcpy(&b, bytes, L);
    return __builtin_convertvector(b, vi);
}

static inline vf codes_of(vi bytes, int shift, int bits) {
    return __builtin_convertvector((bytes >> shift) & ((1 << bits) - 1), vf);
}

// e^x for a softmax's shifted logits (x <= 0): 2^n e^r with |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error about 1e-7); it vectorises, where std::exp does not.
static inline float exp_nonpositive(float x) {
    x = std::max(x, -87.f);
    const float n = std::nearbyint(x * 1.44269504f);
    const float r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits;
    std::memcpy(&bits, &p, 4);
    bits += static_cast<int32_t>(n) << 23;
    std::memcpy(&p, &bits, 4);
    return x <= -87.f ? 0.f : p;
}

// logits[g][t] = scale * q_g . k̂(s0 + t), t < n, L slots at a time. k̂ = c s + l per channel and group of slots, so
// q . k̂ = sum_d (q s)_d c_d + q . l: q s and q . l once per group, then one multiply-add per code.
static void key_logits(const float* q, const uint8_t* kc, const float* ks, const float* kl, int64_t s0, int64_t n,
                       float scale, float* logits) {
    alignas(64) float qs[G][D];
    float ql[G];
    alignas(64) uint8_t byte_of[KW][L];  // byte i of the block's L keys, slot-contiguous
    for (int64_t t0 = 0; t0 < n; t0 += L) {
        const int64_t s = s0 + t0, count = std::min<int64_t>(L, n - t0);
        if (t0 == 0 || s % GK == 0) {
            const float* gs = ks + (s / GK) * D;
            const float* gl = kl + (s / GK) * D;
            for (int64_t g = 0; g < G; ++g) {
                float dot = 0.f;
                for (int64_t d = 0; d < D; ++d) {
                    qs[g][d] = q[g * D + d] * scale * gs[d];
                    dot += q[g * D + d] * gl[d];
                }
                ql[g] = dot * scale;
            }
        }
        std::memset(byte_of, 0, sizeof(byte_of));
        for (int64_t l = 0; l < count; ++l)
            for (int64_t i = 0; i < KW; ++i) byte_of[i][l] = kc[(s + l) * KW + i];
        vf acc[G];
        for (int64_t g = 0; g < G; ++g) acc[g] = vf{} + ql[g];
        for (int64_t i = 0; i < KW; ++i) {
            const vi bytes = widened(byte_of[i]);
            for (int64_t j = 0; j < KP; ++j) {  // byte i's code j is channel i * KP + j
                const vf c = codes_of(bytes, KB * j, KB);
                for (int64_t g = 0; g < G; ++g) acc[g] += qs[g][i * KP + j] * c;
            }
        }
        for (int64_t g = 0; g < G; ++g) std::memcpy(logits + g * n + t0, &acc[g], count * sizeof(float));
    }
}

// out_g = sum_t p[g][t] v̂(s0 + t), L channels of one code plane at a time (plane j holds channels i * VP + j).
// v̂ = c s + l per slot and group of channels.
static void value_sum(const float* p, const uint8_t* vc, const float* vs, const float* vl, int64_t s0, int64_t n,
                      float* out) {
    vi group[VP][VC];  // the value group of each lane
    for (int64_t j = 0; j < VP; ++j)
        for (int64_t c = 0; c < VC; ++c)
            for (int64_t l = 0; l < L; ++l) group[j][c][l] = static_cast<int32_t>(((c * L + l) * VP + j) / GV);
    vf acc[G][VP][VC] = {};
    for (int64_t t = 0; t < n; ++t) {
        const int64_t s = s0 + t;
        const float* ss = vs + s * NGV;
        const float* sl = vl + s * NGV;
        for (int64_t c = 0; c < VC; ++c) {
            const vi bytes = widened(vc + s * VW + c * L);
            for (int64_t j = 0; j < VP; ++j) {
                vf sc = vf{} + ss[0], lo = vf{} + sl[0];
                for (int32_t k = 1; k < NGV; ++k) {
                    sc = group[j][c] == k ? vf{} + ss[k] : sc;
                    lo = group[j][c] == k ? vf{} + sl[k] : lo;
                }
                const vf x = codes_of(bytes, VB * j, VB) * sc + lo;
                for (int64_t g = 0; g < G; ++g) acc[g][j][c] += p[g * n + t] * x;
            }
        }
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < VP; ++j)
            for (int64_t c = 0; c < VC; ++c)
                for (int64_t l = 0; l < L; ++l) out[g * D + (c * L + l) * VP + j] = acc[g][j][c][l];
}

// One KV head's G queries over its n packed slots from s0: the normalised output and each query's log-sum-exp
// (-inf, output 0, without slots), for the caller to merge with the dense region.
static void head(const float* q, const uint8_t* kc, const float* ks, const float* kl, const uint8_t* vc,
                 const float* vs, const float* vl, int64_t s0, int64_t n, float scale, float* out, float* lse) {
    if (n <= 0) {
        std::fill(out, out + G * D, 0.f);
        std::fill(lse, lse + G, -std::numeric_limits<float>::infinity());
        return;
    }
    std::vector<float> p(G * n);
    key_logits(q, kc, ks, kl, s0, n, scale, p.data());
    for (int64_t g = 0; g < G; ++g) {
        float* l = p.data() + g * n;
        const float m = *std::max_element(l, l + n);
        float sum = 0.f;
        #pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
            l[t] = exp_nonpositive(l[t] - m);
            sum += l[t];
        }
        const float inv = 1.f / sum;
        #pragma omp simd
        for (int64_t t = 0; t < n; ++t) l[t] *= inv;
        lse[g] = m + std::log(sum);
    }
    value_sum(p.data(), vc, vs, vl, s0, n, out);
}

// q, out [rows, n_kv * G, D]; lse [rows, n_kv * G]; codes [rows, slots, bytes]; key statistics [rows, slots / GK, D];
// value statistics [rows, slots, D / GV]; q_start, q_len [rows, n_kv] (int32): KV head h's packed slots.
extern "C" void kernel(const float* q, const uint8_t* kc, const float* ks, const float* kl, const uint8_t* vc,
                       const float* vs, const float* vl, const int32_t* q_start, const int32_t* q_len, float* out,
                       float* lse, int64_t rows, int64_t n_kv, int64_t slots, float scale, int64_t threads) {
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < rows; ++b)
        for (int64_t h = 0; h < n_kv; ++h) {
            const int64_t bh = b * n_kv + h, row = b * slots;
            head(q + bh * G * D, kc + row * KW, ks + (row / GK) * D, kl + (row / GK) * D, vc + row * VW,
                 vs + row * NGV, vl + row * NGV, q_start[bh], q_len[bh], scale, out + bh * G * D, lse + bh * G);
        }
}
