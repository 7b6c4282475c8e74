// Checks src/model/cuda_kernels.cu on the CPU (through cuda_emu.h) against plain double-precision
// references: the dense-layer epilogue for every activation and dtype, and the attention kernel
// for head sizes 32..128, full and causal sequences of several lengths (packed rows, key chunks
// cut short), pooled single queries, and partial query tiles. Exit status 1 on a mismatch.
#include "cuda_emu.h"
#include "../../src/model/cuda_kernels.cu"

#include <cstdio>
#include <random>
#include <string>

static std::mt19937 rng(1234);
static int failures = 0;

template <typename T> struct Dt;
template <> struct Dt<float> {
    static constexpr const char *name = "f32";
    static constexpr double eps = 1e-6;
};
template <> struct Dt<__half> {
    static constexpr const char *name = "f16";
    static constexpr double eps = 1.0 / 1024;
};
template <> struct Dt<__nv_bfloat16> {
    static constexpr const char *name = "bf16";
    static constexpr double eps = 1.0 / 128;
};

template <typename T> std::vector<T> random_vec(size_t n, float scale) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<T> v(n);
    for (auto &x : v) x = from_f<T>(dist(rng));
    return v;
}

static double act_ref(double x, uint32_t act) {
    switch (act) {
    case 1: return x / (1.0 + std::exp(-1.702 * x));
    case 2: return x / (1.0 + std::exp(-x));
    case 3: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case 4: return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    default: return x;
    }
}

static void report(const std::string &what, double err, double tol) {
    const bool ok = err <= tol;
    if (!ok) ++failures;
    std::printf("%-4s %-70s max error %.3g (tolerance %.3g)\n", ok ? "ok" : "FAIL", what.c_str(), err, tol);
}

template <typename T> void check_bias_act(uint32_t rows, uint32_t cols, uint32_t act, bool residual) {
    auto y = random_vec<T>((size_t)rows * cols, 2.0f), b = random_vec<T>(cols, 1.0f),
         r = random_vec<T>((size_t)rows * cols, 1.0f);
    const auto y0 = y;
    const uint32_t threads = 32, blocks = 3; // fewer than rows and columns: both strides
    emu::launch({blocks, 1, 1}, {threads, 1, 1}, [&] {
        bias_act_impl<T>(y.data(), b.data(), residual ? r.data() : nullptr, rows, cols, act);
    });
    double err = 0;
    for (size_t i = 0; i < y.size(); ++i) {
        double want = act_ref((double)to_f(y0[i]) + to_f(b[i % cols]), act);
        if (residual) want += to_f(r[i]);
        const double got = to_f(y[i]);
        err = std::max(err, std::abs(got - want) / std::max(1.0, std::abs(want)));
    }
    report(std::string("bias_act ") + Dt<T>::name + " " + std::to_string(rows) + "x" +
               std::to_string(cols) + " act " + std::to_string(act) + (residual ? " +residual" : ""),
           err, Dt<T>::eps * 1.01);
}

struct Seq {
    uint32_t kv_start, kv_len, item_start, item_count, pos0;
};

// q rows [items, q_stride], kv rows [keys, kv_stride]; returns out [items, heads·hd].
template <typename T>
std::vector<double> attention_ref(const std::vector<T> &q, uint32_t q_stride, const std::vector<T> &kv,
                                  uint32_t kv_stride, uint32_t k_off, uint32_t v_off,
                                  const std::vector<Seq> &seqs, uint32_t heads, uint32_t hd,
                                  bool causal, uint32_t n_items) {
    std::vector<double> out((size_t)n_items * heads * hd, 0.0);
    for (const Seq &s : seqs)
        for (uint32_t it = 0; it < s.item_count; ++it)
            for (uint32_t h = 0; h < heads; ++h) {
                const uint32_t qrow = s.item_start + it, limit = causal ? std::min(s.kv_len, s.pos0 + it + 1) : s.kv_len;
                std::vector<double> sc(limit);
                double mx = -INFINITY;
                for (uint32_t j = 0; j < limit; ++j) {
                    double a = 0;
                    for (uint32_t d = 0; d < hd; ++d)
                        a += (double)to_f(q[(size_t)qrow * q_stride + h * hd + d]) *
                             to_f(kv[(size_t)(s.kv_start + j) * kv_stride + k_off + h * hd + d]);
                    sc[j] = a;
                    mx = std::max(mx, a);
                }
                double sum = 0;
                for (auto &x : sc) sum += (x = std::exp(x - mx));
                for (uint32_t d = 0; d < hd; ++d) {
                    double a = 0;
                    for (uint32_t j = 0; j < limit; ++j)
                        a += sc[j] * to_f(kv[(size_t)(s.kv_start + j) * kv_stride + v_off + h * hd + d]);
                    out[(size_t)qrow * heads * hd + h * hd + d] = a / sum;
                }
            }
    return out;
}

template <typename T, int R>
void run_attention(const std::vector<T> &q, uint32_t q_stride, const std::vector<T> &kv, uint32_t kv_stride,
                   uint32_t k_off, uint32_t v_off, std::vector<T> &out, uint32_t out_stride,
                   const std::vector<Seq> &seqs, uint32_t heads, uint32_t hd, bool causal, uint32_t warps) {
    uint32_t max_items = 0;
    std::vector<uint32_t> table;
    for (const Seq &s : seqs) {
        max_items = std::max(max_items, s.item_count);
        table.insert(table.end(), {s.kv_start, s.kv_len, s.item_start, s.item_count, s.pos0});
    }
    const dim3 grid{(max_items + warps - 1) / warps, heads, (uint32_t)seqs.size()};
    emu::launch(grid, {32 * warps, 1, 1}, [&] {
        attention_impl<T, R>(q.data(), q_stride, kv.data(), kv_stride, k_off, v_off, out.data(), out_stride,
                             table.data(), hd, causal);
    });
}

template <typename T, int R>
void check_attention(const std::vector<uint32_t> &lens, uint32_t heads, uint32_t hd, bool causal, bool pooled,
                     uint32_t warps) {
    const uint32_t h = heads * hd;
    uint32_t n = 0;
    for (auto l : lens) n += l;
    std::vector<Seq> seqs;
    std::vector<T> q, kv;
    uint32_t q_stride, kv_stride, k_off, v_off, n_items;
    if (!pooled) {
        // One [N, 3H] QKV output: queries, keys, values side by side, queries pre-scaled.
        kv = random_vec<T>((size_t)n * 3 * h, 1.0f);
        for (size_t i = 0; i < n; ++i)
            for (uint32_t c = 0; c < h; ++c)
                kv[i * 3 * h + c] = from_f<T>(to_f(kv[i * 3 * h + c]) / std::sqrt((float)hd));
        q = kv;
        q_stride = kv_stride = 3 * h, k_off = h, v_off = 2 * h, n_items = n;
        uint32_t start = 0;
        for (auto l : lens) {
            seqs.push_back({start, l, start, l, 0});
            start += l;
        }
    } else {
        // The last layer: one query per sequence ([B, H]) against [N, 2H] keys and values.
        kv = random_vec<T>((size_t)n * 2 * h, 1.0f);
        q = random_vec<T>(lens.size() * h, 0.3f);
        q_stride = h, kv_stride = 2 * h, k_off = 0, v_off = h, n_items = lens.size();
        uint32_t start = 0;
        for (uint32_t i = 0; i < lens.size(); ++i) {
            seqs.push_back({start, lens[i], i, 1, causal ? lens[i] - 1 - (i % 2) * (lens[i] / 2) : 0});
            start += lens[i];
        }
    }
    std::vector<T> out((size_t)n_items * h, from_f<T>(NAN));
    run_attention<T, R>(q, q_stride, kv, kv_stride, k_off, v_off, out, h, seqs, heads, hd, causal, warps);
    const auto want = attention_ref(q, q_stride, kv, kv_stride, k_off, v_off, seqs, heads, hd, causal, n_items);
    double err = 0;
    for (size_t i = 0; i < out.size(); ++i) {
        const double got = to_f(out[i]);
        err = std::isnan(got) ? INFINITY : std::max(err, std::abs(got - want[i]) / std::max(1.0, std::abs(want[i])));
    }
    std::string ls;
    for (auto l : lens) ls += std::to_string(l) + ",";
    report(std::string("attention ") + Dt<T>::name + " lens " + ls + " heads " + std::to_string(heads) +
               " hd " + std::to_string(hd) + (causal ? " causal" : "") + (pooled ? " pooled" : "") +
               " warps " + std::to_string(warps),
           err, Dt<T>::eps * 1.01);
}

// Layer norm forward and backward on `rows` rows of h, `blocks` blocks of `threads` threads
// (fewer blocks than rows: several rows per block), against double-precision references.
template <typename T> void check_layer_norm(uint32_t rows, uint32_t h, uint32_t blocks, uint32_t threads) {
    const float eps = 1e-5f;
    auto x = random_vec<T>((size_t)rows * h, 1.5f), w = random_vec<T>(h, 1.0f), b = random_vec<T>(h, 0.5f),
         g = random_vec<T>((size_t)rows * h, 1.0f);
    // A large mean on one row: the two-pass variance must hold.
    for (uint32_t c = 0; c < h; ++c) x[c] = from_f<T>(to_f(x[c]) * 0.1f + 40.0f);
    std::vector<T> y((size_t)rows * h), dx((size_t)rows * h), dwb(2 * h);
    std::vector<float> partial((size_t)blocks * 2 * h, NAN);
    emu::launch({blocks, 1, 1}, {threads, 1, 1},
                [&] { layer_norm_impl<T>(x.data(), w.data(), b.data(), y.data(), rows, h, eps); });
    emu::launch({blocks, 1, 1}, {threads, 1, 1}, [&] {
        layer_norm_grad_impl<T>(x.data(), w.data(), g.data(), dx.data(), partial.data(), rows, h, eps);
    });
    emu::launch({2, 1, 1}, {32, 1, 1}, [&] { column_sums_impl<T>(partial.data(), blocks, 2 * h, dwb.data()); });
    double ey = 0, edx = 0, edw = 0, edb = 0, sdx = 0, sdw = 0, sdb = 0;
    std::vector<double> dw(h, 0.0), db(h, 0.0);
    for (uint32_t r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (uint32_t c = 0; c < h; ++c) mean += to_f(x[(size_t)r * h + c]);
        mean /= h;
        for (uint32_t c = 0; c < h; ++c) var += std::pow(to_f(x[(size_t)r * h + c]) - mean, 2);
        const double rstd = 1.0 / std::sqrt(var / h + eps);
        std::vector<double> xhat(h), d(h);
        double m1 = 0, m2 = 0;
        for (uint32_t c = 0; c < h; ++c) {
            const size_t i = (size_t)r * h + c;
            xhat[c] = (to_f(x[i]) - mean) * rstd;
            d[c] = (double)to_f(g[i]) * to_f(w[c]);
            m1 += d[c] / h;
            m2 += d[c] * xhat[c] / h;
            dw[c] += (double)to_f(g[i]) * xhat[c];
            db[c] += to_f(g[i]);
            const double want = xhat[c] * to_f(w[c]) + to_f(b[c]);
            ey = std::max(ey, std::abs(to_f(y[i]) - want) / std::max(1.0, std::abs(want)));
        }
        for (uint32_t c = 0; c < h; ++c) {
            const double want = rstd * (d[c] - m1 - xhat[c] * m2);
            edx = std::max(edx, std::abs(to_f(dx[(size_t)r * h + c]) - want));
            sdx = std::max(sdx, std::abs(want));
        }
    }
    for (uint32_t c = 0; c < h; ++c) {
        edw = std::max(edw, std::abs(to_f(dwb[c]) - dw[c]));
        edb = std::max(edb, std::abs(to_f(dwb[h + c]) - db[c]));
        sdw = std::max(sdw, std::abs(dw[c]));
        sdb = std::max(sdb, std::abs(db[c]));
    }
    const std::string what = std::string("layer_norm ") + Dt<T>::name + " " + std::to_string(rows) + "x" +
                             std::to_string(h) + " blocks " + std::to_string(blocks) + " threads " +
                             std::to_string(threads);
    // 16-bit: one rounding of the output. f32: the first row's mean (about 40) carries f32's
    // rounding, ~ulp(40)/2 = 1.9e-6, which is 1.3e-5 of that row's spread of 0.15, times |w|.
    // (A one-pass variance E[x²] − E[x]² would be off by ~5e-3 there.)
    const double tol = std::max(Dt<T>::eps, 1e-5) * 1.01;
    report(what + " y", ey, std::max(tol, 1e-4));
    report(what + " dx (relative to max)", edx / sdx, tol);
    report(what + " dw (relative to max)", edw / sdw, tol);
    report(what + " db (relative to max)", edb / sdb, tol);
}

// QuickGELU forward and backward over n elements (grid-stride: fewer threads than elements).
template <typename T> void check_quick_gelu(uint64_t n) {
    auto x = random_vec<T>(n, 3.0f), g = random_vec<T>(n, 1.0f);
    std::vector<T> y(n), dx(n);
    emu::launch({2, 1, 1}, {64, 1, 1}, [&] { quick_gelu_impl<T>(x.data(), y.data(), n); });
    emu::launch({2, 1, 1}, {64, 1, 1}, [&] { quick_gelu_grad_impl<T>(x.data(), g.data(), dx.data(), n); });
    double ey = 0, edx = 0;
    for (uint64_t i = 0; i < n; ++i) {
        const double v = to_f(x[i]), s = 1.0 / (1.0 + std::exp(-1.702 * v));
        const double want_y = v * s, want_dx = to_f(g[i]) * s * (1.0 + 1.702 * v * (1.0 - s));
        ey = std::max(ey, std::abs(to_f(y[i]) - want_y) / std::max(1.0, std::abs(want_y)));
        edx = std::max(edx, std::abs(to_f(dx[i]) - want_dx) / std::max(1.0, std::abs(want_dx)));
    }
    const std::string what = std::string("quick_gelu ") + Dt<T>::name + " n " + std::to_string(n);
    // f32: expf's rounding (ulps on the device), scaled up by 1.702·x in the gradient.
    const double tol = std::max(Dt<T>::eps, 4e-6) * 1.01;
    report(what + " y", ey, tol);
    report(what + " dx", edx, tol);
}

template <typename T> void check_all() {
    for (uint32_t act = 0; act <= 4; ++act) {
        check_bias_act<T>(7, 33, act, false);
        check_bias_act<T>(5, 64, act, true);
    }
    // ViT-B/32 (50 tokens, head 64), text (packed causal rows up to 77), odd head sizes.
    check_attention<T, 2>({50, 50, 50}, 2, 64, false, false, 8);
    check_attention<T, 2>({50, 50}, 3, 64, false, false, 3);
    check_attention<T, 2>({5, 77, 33, 1, 32, 64}, 2, 64, true, false, 8);
    check_attention<T, 1>({40, 9}, 2, 32, true, false, 4);
    check_attention<T, 1>({19}, 1, 24, false, false, 2);
    check_attention<T, 3>({70, 3}, 2, 80, false, false, 8);
    check_attention<T, 4>({65, 31}, 1, 128, true, false, 8);
    check_attention<T, 2>({50, 50, 50, 50}, 2, 64, false, true, 1);
    check_attention<T, 2>({5, 77, 33, 1}, 2, 64, true, true, 1);
    // Layer norm: h below one thread per column, odd, and exactly LN_COLS·threads (ViT-B/32).
    check_layer_norm<T>(3, 37, 1, 32);
    check_layer_norm<T>(7, 64, 3, 32);
    check_layer_norm<T>(5, 200, 5, 64);
    check_layer_norm<T>(9, 768, 4, 192);
    check_quick_gelu<T>(1000);
}

int main() {
    check_all<float>();
    check_all<__half>();
    check_all<__nv_bfloat16>();
    std::printf(failures ? "%d check(s) failed\n" : "all checks passed\n", failures);
    return failures ? 1 : 0;
}
