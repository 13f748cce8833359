// Tests of kvc/quant/kivi.hpp and of KvCache's GroupsKeys path: the packed format by hand,
// the round-trip bound on random and adversarial groups, KIVI's residual semantics (which
// tokens are quantized when, and with which group), attend on the stored data against
// float64, eviction inside quantized groups, fork, truncate, exact byte accounting and the
// composition with H2O, SnapKV and D2O.
#include <kvc/quant/kivi.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/d2o.hpp>
#include <kvc/evict/external.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>

#include <catch2/catch.hpp>

#include "../support/quantizer_checks.hpp"
#include "../support/reference.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <vector>

namespace {

using kvc::test::random_tensor;
using kvc::test::Tensor3;

static_assert(kvc::Quantizer<kvc::quant::Kivi<2>> && kvc::Quantizer<kvc::quant::Kivi<4>> &&
              kvc::Quantizer<kvc::quant::Kivi<8>>);
static_assert(kvc::GroupsKeys<kvc::quant::Kivi<2>> && !kvc::QuantizesTokens<kvc::quant::Kivi<2>>);

float half_at(const std::byte* bytes) {
  return kvc::simd::load_fp16(bytes);
}

// Every element of a group of `count` values (stride apart) against its group's (m̂, ŝ):
// the range fits the codes and |x − x̂| ≤ ŝ/2 (plus fp32 rounding of m̂ + ŝ·q).
template <unsigned Bits>
void check_group_bound(const float* x, std::size_t count, std::size_t stride, float m, float s,
                       const float* decoded) {
  constexpr double levels = (1U << Bits) - 1U;
  double lo = x[0];
  double hi = x[0];
  for (std::size_t i = 0; i < count; ++i) {
    lo = std::min(lo, double(x[i * stride]));
    hi = std::max(hi, double(x[i * stride]));
  }
  REQUIRE(double(m) <= lo);
  REQUIRE(double(m) + levels * double(s) >= hi);
  REQUIRE(s >= 0.0F);
  const double slack = 4.0 * std::ldexp(1.0, -24) * (std::abs(double(m)) + levels * double(s));
  for (std::size_t i = 0; i < count; ++i) {
    REQUIRE(std::abs(double(decoded[i * stride]) - double(x[i * stride])) <=
            double(s) / 2.0 + slack + 1e-45);
  }
}

// Groups a test throws at the format: random, constant (fp16 and not), zeros, denormals,
// huge outliers among small values.
std::vector<std::vector<float>> adversarial_groups(std::size_t count, std::size_t d) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> groups;
  auto make = [&](auto value) {
    std::vector<float> g(count * d);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = value(i);
    groups.push_back(std::move(g));
  };
  make([&](std::size_t) { return normal(rng); });
  make([&](std::size_t) { return 3.0F * normal(rng) + 100.0F; });
  make([&](std::size_t) { return 0.5F; });
  make([&](std::size_t) { return 0.1F; });  // not an fp16
  make([&](std::size_t) { return 0.0F; });
  make([&](std::size_t i) { return (i % 3 == 0 ? -1.0F : 1.0F) * 1e-40F * float(i % 7); });
  make([&](std::size_t i) {
    return i % 17 == 0 ? (i % 2 == 0 ? 65504.0F : -60000.0F) : normal(rng);
  });
  make([&](std::size_t i) { return i % 5 == 0 ? -65504.0F : 0.25F * normal(rng); });
  return groups;
}

template <unsigned Bits>
void check_keys_round_trip() {
  const kvc::quant::Kivi<Bits, 32, 64> kivi;
  const std::size_t d = 64;
  for (const std::size_t count : {std::size_t{1}, std::size_t{7}, std::size_t{32}}) {
    for (const auto& rows : adversarial_groups(count, d)) {
      std::vector<std::byte> params(kivi.key_group_bytes(d));
      std::vector<std::byte> codes(count * kivi.key_bytes(d));
      kivi.encode_key_group(rows.data(), count, d, params.data(), codes.data());
      std::vector<float> decoded(count * d);
      for (std::size_t t = 0; t < count; ++t) {
        kivi.decode_key(codes.data() + t * kivi.key_bytes(d), d, params.data(),
                        decoded.data() + t * d);
      }
      for (std::size_t c = 0; c < d; ++c) {
        check_group_bound<Bits>(rows.data() + c, count, d, half_at(params.data() + 2 * c),
                                half_at(params.data() + 2 * (d + c)), decoded.data() + c);
      }
      // A constant channel whose value is an fp16 comes back exactly.
      if (rows[0] == 0.5F && rows[1] == 0.5F) REQUIRE(decoded == rows);
      if (rows[0] == 0.0F && rows[1] == 0.0F) REQUIRE(decoded == rows);
    }
  }
}

template <unsigned Bits>
void check_values_round_trip() {
  const kvc::quant::Kivi<Bits, 32, 64> kivi;
  const std::size_t d = 96;  // three channel groups
  for (const auto& rows : adversarial_groups(3, d)) {
    for (std::size_t t = 0; t < 3; ++t) {
      const float* row = rows.data() + t * d;
      std::vector<std::byte> codes(kivi.value_bytes(d));
      kivi.encode_value(row, d, codes.data());
      std::vector<float> decoded(d);
      kivi.decode_value(codes.data(), d, decoded.data());
      for (std::size_t g = 0; g < d / 32; ++g) {
        check_group_bound<Bits>(row + 32 * g, 32, 1, half_at(codes.data() + 4 * g),
                                half_at(codes.data() + 4 * g + 2), decoded.data() + 32 * g);
      }
    }
  }
}

}  // namespace

TEST_CASE("kivi: value and key codes and fp16 parameters, by hand", "[quant][kivi]") {
  const kvc::quant::Kivi<2, 8, 8> kivi;
  CHECK(kivi.key_bytes(8) == 2);
  CHECK(kivi.value_bytes(8) == 4 + 2);
  CHECK(kivi.key_group_bytes(8) == 32);
  const float row[8] = {0, 1, 2, 3, 3, 2, 1, 0};
  std::byte value[6];
  kivi.encode_value(row, 8, value);
  // m̂ = 0 (fp16 0x0000), ŝ = 3 / 3 = 1 (0x3c00), codes 0 1 2 3 3 2 1 0, planar: byte 0
  // holds channels 0 2 4 6 (codes 0 2 3 1) at bits 0 2 4 6, byte 1 channels 1 3 5 7
  // (codes 1 3 2 0).
  const std::byte expected[6] = {std::byte{0x00}, std::byte{0x00}, std::byte{0x00},
                                 std::byte{0x3c}, std::byte{0x78}, std::byte{0x2d}};
  CHECK(std::memcmp(value, expected, 6) == 0);
  float decoded[8];
  kivi.decode_value(value, 8, decoded);
  CHECK(std::equal(decoded, decoded + 8, row));

  // Keys per channel: channel c over two tokens {c, −c}: m̂ = −c, ŝ = 2c / 3 rounded up to
  // fp16; token 0 gets code 3, token 1 code 0.
  float keys[16];
  for (int c = 0; c < 8; ++c) {
    keys[c] = float(c);
    keys[8 + c] = -float(c);
  }
  std::byte params[32];
  std::byte codes[4];
  kivi.encode_key_group(keys, 2, 8, params, codes);
  for (int c = 0; c < 8; ++c) {
    CHECK(half_at(params + 2 * c) == -float(c));
    const float s = half_at(params + 16 + 2 * c);
    CHECK(s >= 2.0F * float(c) / 3.0F);
    CHECK(s == float(Eigen::half(s)));
  }
  // Token 0: channel 0 (constant) code 0, the others 3; byte 0 holds channels 0 2 4 6.
  CHECK(codes[0] == std::byte{0xfc});
  CHECK(codes[1] == std::byte{0xff});
  CHECK(codes[2] == std::byte{0x00});
  CHECK(codes[3] == std::byte{0x00});
}

TEST_CASE("kivi: round trip within half a step on random and adversarial groups", "[quant][kivi]") {
  check_keys_round_trip<2>();
  check_keys_round_trip<4>();
  check_keys_round_trip<8>();
  check_values_round_trip<2>();
  check_values_round_trip<4>();
  check_values_round_trip<8>();
}

TEST_CASE("kivi: the integer tiles stay within the rounding bound of the exact ones",
          "[quant][kivi][simd]") {
  using Kivi = kvc::quant::Kivi<2>;  // G = 32
  const Kivi kivi;
  const std::size_t dim = 128, tokens = 40, rows = 6;
  std::mt19937 rng(17);
  std::normal_distribution<float> normal;
  std::vector<float> keys(tokens * dim), values(tokens * dim), queries(rows * dim);
  for (float& x : keys) x = normal(rng);
  for (float& x : values) x = normal(rng);
  for (float& x : queries) x = normal(rng);
  std::vector<std::byte> params(kivi.key_group_bytes(dim));
  std::vector<std::byte> key_codes(tokens * kivi.key_bytes(dim));
  kivi.encode_key_group(keys.data(), tokens, dim, params.data(), key_codes.data());
  std::vector<std::byte> value_codes(tokens * kivi.value_bytes(dim));
  for (std::size_t j = 0; j < tokens; ++j) {
    kivi.encode_value(values.data() + j * dim, dim, value_codes.data() + j * kivi.value_bytes(dim));
  }
  std::vector<float> scratch((tokens + rows + 2) * dim);
  std::vector<float> fast(rows * tokens), exact(rows * tokens);
  kivi.score_tile({queries.data(), rows, key_codes.data(), tokens, dim, fast.data(), tokens,
                   scratch.data(), false},
                  params.data());
  kivi.score_tile({queries.data(), rows, key_codes.data(), tokens, dim, exact.data(), tokens,
                   scratch.data(), true},
                  params.data());
  // Exact: q·k̂ in float64 on the decoded keys.
  std::vector<float> decoded(dim);
  for (std::size_t j = 0; j < tokens; ++j) {
    kivi.decode_key(key_codes.data() + j * kivi.key_bytes(dim), dim, params.data(), decoded.data());
    unsigned code_sum = 0;
    for (std::size_t c = 0; c < dim; ++c) {
      code_sum += kvc::quant::detail::AsymmetricCodes<2>::get(
          key_codes.data() + j * kivi.key_bytes(dim), c, dim);
    }
    for (std::size_t r = 0; r < rows; ++r) {
      double reference = 0.0, w_max = 0.0;
      for (std::size_t c = 0; c < dim; ++c) {
        reference += double(queries[r * dim + c]) * double(decoded[c]);
        w_max = std::max(w_max, std::abs(double(queries[r * dim + c]) *
                                         kvc::simd::load_fp16(params.data() + 2 * (dim + c))));
      }
      REQUIRE(std::abs(exact[r * tokens + j] - reference) < 1e-4);
      // ŵ moves each q_c·s_c by at most w_max/254.
      const double bound = kvc::simd::has_int8_dot ? w_max / 254.0 * code_sum + 1e-4 : 1e-4;
      REQUIRE(std::abs(fast[r * tokens + j] - reference) <= bound);
    }
  }

  // Values: softmax-like weights, acc = Σ_j p_j v̂_j against float64.
  std::vector<float> p(rows * tokens);
  std::uniform_real_distribution<float> uniform(0.0F, 1.0F);
  for (float& x : p) x = uniform(rng);
  std::vector<float> acc(rows * dim, 0.0F);
  kivi.accumulate_tile(
      {p.data(), rows, tokens, value_codes.data(), tokens, dim, acc.data(), scratch.data()});
  for (std::size_t r = 0; r < rows; ++r) {
    std::vector<double> reference(dim, 0.0), bound(dim, 1e-4);
    std::vector<double> w_max(dim / 32, 0.0);
    for (std::size_t j = 0; j < tokens; ++j) {
      for (std::size_t g = 0; g < dim / 32; ++g) {
        const float s =
            kvc::simd::load_fp16(value_codes.data() + j * kivi.value_bytes(dim) + 4 * g + 2);
        w_max[g] = std::max(w_max[g], double(p[r * tokens + j]) * s);
      }
    }
    for (std::size_t j = 0; j < tokens; ++j) {
      const std::byte* row = value_codes.data() + j * kivi.value_bytes(dim);
      kivi.decode_value(row, dim, decoded.data());
      for (std::size_t c = 0; c < dim; ++c) {
        reference[c] += double(p[r * tokens + j]) * double(decoded[c]);
        // ŵ moves each weight p·s by at most w_max/510 (u8 against the tile's largest).
        if (kvc::simd::has_int8_dot) {
          bound[c] +=
              w_max[c / 32] / 510.0 * kvc::quant::detail::AsymmetricCodes<2>::get(row + 16, c, dim);
        }
      }
    }
    for (std::size_t c = 0; c < dim; ++c) {
      REQUIRE(std::abs(acc[r * dim + c] - reference[c]) <= bound[c]);
    }
  }
}

namespace {

constexpr std::size_t d = 64;
constexpr std::size_t residual = 64;
// The exact fp32 path differs from float64 by rounding only; the integer path rounds each
// row q∘s to int8 and each tile's weights to u8 (bounded exactly by the tile test above),
// which moves these random, nearly flat attention outputs by a few percent of their largest.
const double attend_tolerance = kvc::simd::has_int8_dot ? 5e-2 : 1e-4;
constexpr std::size_t group = 32;
using Kivi2 = kvc::quant::Kivi<2, group, residual>;
const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = d};

// What KIVI stores for the tokens a head holds, in order, from their original rows (no
// eviction): keys sealed in groups of G for the first ⌊n/R⌋·R, the rest exact; values
// encoded per token for the first n − R, the newest R exact.
struct Expected {
  std::vector<float> keys, values;
};
template <class Q>
Expected kivi_reference(const Q& kivi, const std::vector<float>& keys,
                        const std::vector<float>& values, std::size_t n) {
  Expected e{keys, values};
  const std::size_t sealed = n / residual * residual;
  std::vector<std::byte> params(kivi.key_group_bytes(d));
  std::vector<std::byte> codes(group * kivi.key_bytes(d));
  for (std::size_t first = 0; first < sealed; first += group) {
    kivi.encode_key_group(keys.data() + first * d, group, d, params.data(), codes.data());
    for (std::size_t j = 0; j < group; ++j) {
      kivi.decode_key(codes.data() + j * kivi.key_bytes(d), d, params.data(),
                      e.keys.data() + (first + j) * d);
    }
  }
  std::vector<std::byte> value(kivi.value_bytes(d));
  for (std::size_t t = 0; t + residual < n; ++t) {
    kivi.encode_value(values.data() + t * d, d, value.data());
    kivi.decode_value(value.data(), d, e.values.data() + t * d);
  }
  return e;
}

std::vector<float> head_rows(const Tensor3& x, std::size_t h) {
  return {x.data.begin() + static_cast<std::ptrdiff_t>(h * x.tokens * d),
          x.data.begin() + static_cast<std::ptrdiff_t>((h + 1) * x.tokens * d)};
}

std::vector<float> matrix(const kvc::DenseLayer::Matrix& m) {
  return {m.data(), m.data() + m.size()};
}

template <class Cache>
void append_range(Cache& cache, kvc::SequenceId seq, const Tensor3& k, const Tensor3& v,
                  std::size_t first, std::size_t count) {
  cache.append(seq, 0, k.slice(first, count), v.slice(first, count));
}

}  // namespace

TEST_CASE("kivi: the cache quantizes keys every R tokens in groups of G and slides values",
          "[quant][kivi][cache]") {
  std::mt19937 rng(3);
  const std::size_t total = 230;
  const Tensor3 k = random_tensor(rng, 2, total, d);
  const Tensor3 v = random_tensor(rng, 2, total, d);
  const Kivi2 kivi;
  // The same tokens appended as one prefill of 150 then decode steps, or all one by one:
  // KIVI's prefill and decode rules seal the same groups.
  for (const std::size_t prefill : {std::size_t{150}, std::size_t{1}}) {
    kvc::KvCache<kvc::evict::Full, Kivi2> cache(geometry, {.page_tokens = 16});
    const auto seq = cache.open_sequence();
    append_range(cache, seq, k, v, 0, prefill);
    for (std::size_t n = prefill;;) {
      if (n == 150 || n == 191 || n == 192 || n == 193 || n == total) {
        const kvc::DenseLayer dense = cache.export_dense(seq, 0);
        for (std::size_t h = 0; h < 2; ++h) {
          std::vector<float> keys = head_rows(k, h);
          std::vector<float> values = head_rows(v, h);
          keys.resize(n * d);
          values.resize(n * d);
          const Expected expected = kivi_reference(kivi, keys, values, n);
          REQUIRE(matrix(dense.keys[h]) == expected.keys);
          REQUIRE(matrix(dense.values[h]) == expected.values);
        }
        const Tensor3 q = random_tensor(rng, 8, 3, d);
        Tensor3 out(8, 3, d);
        cache.attend(seq, 0, q.view(), out.mutable_view());
        REQUIRE(kvc::test::attend_error(cache, seq, 0, q, out) < attend_tolerance);

        // Bytes: sealed key codes + one parameter block per key group + encoded values +
        // the fp32 rows still waiting, per kv head.
        const std::size_t sealed = n / residual * residual;
        const std::size_t encoded_values = n > residual ? n - residual : 0;
        const std::size_t per_head = sealed * kivi.key_bytes(d) +
                                     sealed / group * kivi.key_group_bytes(d) +
                                     encoded_values * kivi.value_bytes(d) +
                                     (2 * n - sealed - encoded_values) * d * sizeof(float);
        const kvc::CacheStats stats = cache.stats();
        REQUIRE(stats.code_bytes == 2 * per_head);
        REQUIRE(stats.staged_bytes >= 2 * (2 * n - sealed - encoded_values) * d * sizeof(float));
        REQUIRE(stats.bytes_held() == stats.page_bytes + stats.metadata_bytes + stats.staged_bytes);
      }
      if (n == total) break;
      append_range(cache, seq, k, v, n, 1);
      ++n;
    }
  }
}

TEST_CASE("kivi: eviction inside quantized groups keeps every survivor's decoded rows",
          "[quant][kivi][cache]") {
  std::mt19937 rng(8);
  const Tensor3 k = random_tensor(rng, 2, 400, d);
  const Tensor3 v = random_tensor(rng, 2, 400, d);
  const Kivi2 kivi;
  kvc::KvCache<kvc::evict::External, Kivi2> cache(
      geometry, {.budget = kvc::Budget::tokens(84), .page_tokens = 16, .auto_compress = false},
      kvc::evict::External({.sink = 0, .recent = 0}));
  const auto seq = cache.open_sequence();
  // 128 tokens: keys sealed in 4 groups, values 0..63 encoded, 64..127 in the window. Evict
  // all of group 0 (positions 0..31), 40..47 (inside group 1, encoded values) and 100..103
  // (inside group 3, window values).
  std::vector<float> scores(128, 1.0F);
  for (std::size_t p = 0; p < 128; ++p) {
    if (p < 32 || (p >= 40 && p < 48) || (p >= 100 && p < 104)) scores[p] = -1.0F;
  }
  for (std::size_t h = 0; h < 2; ++h) cache.scorer().supply(0, h, scores);
  append_range(cache, seq, k, v, 0, 128);
  const kvc::DenseLayer before = cache.export_dense(seq, 0);
  cache.compress(seq);
  const kvc::DenseLayer after = cache.export_dense(seq, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    REQUIRE(after.positions[h].size() == 84);
    for (std::size_t i = 0; i < 84; ++i) {
      const auto p = static_cast<std::size_t>(after.positions[h][i]);
      REQUIRE(scores[p] == 1.0F);
      REQUIRE(after.keys[h].row(static_cast<Eigen::Index>(i)) ==
              before.keys[h].row(static_cast<Eigen::Index>(p)));
      REQUIRE(after.values[h].row(static_cast<Eigen::Index>(i)) ==
              before.values[h].row(static_cast<Eigen::Index>(p)));
    }
  }
  // Group 0's parameters are gone: 84 sealed keys in 3 groups, 64 − 40 = 24 encoded values,
  // 60 values still in fp32.
  const std::size_t per_head = 84 * kivi.key_bytes(d) + 3 * kivi.key_group_bytes(d) +
                               24 * kivi.value_bytes(d) + 60 * d * sizeof(float);
  REQUIRE(cache.stats().code_bytes == 2 * per_head);

  // The window continues from the survivors: 4 more tokens fill it to 64, the fifth pushes
  // the oldest window value (position 64) out; 64 new keys seal two new groups of the new
  // tokens, 128..159 and 160..191.
  std::vector<float> keep(1, 1.0F);
  for (std::size_t n = 128; n < 192; ++n) {
    for (std::size_t h = 0; h < 2; ++h) cache.scorer().supply(0, h, keep);
    append_range(cache, seq, k, v, n, 1);
  }
  const kvc::DenseLayer grown = cache.export_dense(seq, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    REQUIRE(grown.positions[h].size() == 148);
    // The new keys: two groups sealed from their original rows.
    const std::vector<float> keys = head_rows(k, h);
    const std::vector<float> values = head_rows(v, h);
    std::vector<std::byte> params(kivi.key_group_bytes(d));
    std::vector<std::byte> codes(group * kivi.key_bytes(d));
    std::vector<float> decoded(d);
    for (std::size_t first = 128; first < 192; first += group) {
      kivi.encode_key_group(keys.data() + first * d, group, d, params.data(), codes.data());
      for (std::size_t j = 0; j < group; ++j) {
        kivi.decode_key(codes.data() + j * kivi.key_bytes(d), d, params.data(), decoded.data());
        const auto row = grown.keys[h].row(static_cast<Eigen::Index>(84 + first - 128 + j));
        REQUIRE(std::equal(decoded.begin(), decoded.end(), row.data()));
      }
    }
    // Values: 148 stored, the newest 64 exact; the rest encoded per token.
    std::vector<std::byte> value(kivi.value_bytes(d));
    for (std::size_t i = 0; i < 148; ++i) {
      const auto p = static_cast<std::size_t>(grown.positions[h][i]);
      const float* original = values.data() + p * d;
      const auto row = grown.values[h].row(static_cast<Eigen::Index>(i));
      if (i >= 148 - residual) {
        REQUIRE(std::equal(original, original + d, row.data()));
      } else {
        kivi.encode_value(original, d, value.data());
        kivi.decode_value(value.data(), d, decoded.data());
        REQUIRE(std::equal(decoded.begin(), decoded.end(), row.data()));
      }
    }
  }
  const std::size_t grown_per_head = 148 * kivi.key_bytes(d) + 5 * kivi.key_group_bytes(d) +
                                     84 * kivi.value_bytes(d) + 64 * d * sizeof(float);
  REQUIRE(cache.stats().code_bytes == 2 * grown_per_head);
}

TEST_CASE("kivi: fork shares pages copy-on-write and truncate keeps partial groups",
          "[quant][kivi][cache]") {
  std::mt19937 rng(21);
  const Tensor3 k = random_tensor(rng, 2, 300, d);
  const Tensor3 v = random_tensor(rng, 2, 300, d);
  const Kivi2 kivi;
  kvc::KvCache<kvc::evict::Full, Kivi2> cache(geometry, {.page_tokens = 16});
  const auto parent = cache.open_sequence();
  append_range(cache, parent, k, v, 0, 100);
  const auto child = cache.fork(parent);
  const kvc::DenseLayer at_fork = cache.export_dense(parent, 0);
  // The child goes on with other tokens (sealing groups over slots the parent shares).
  const Tensor3 k2 = random_tensor(rng, 2, 100, d);
  const Tensor3 v2 = random_tensor(rng, 2, 100, d);
  append_range(cache, child, k2, v2, 0, 100);
  const kvc::DenseLayer parent_now = cache.export_dense(parent, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    REQUIRE(parent_now.keys[h] == at_fork.keys[h]);
    REQUIRE(parent_now.values[h] == at_fork.values[h]);
  }
  const kvc::DenseLayer child_now = cache.export_dense(child, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    std::vector<float> keys = head_rows(k, h);
    std::vector<float> values = head_rows(v, h);
    keys.resize(100 * d);
    values.resize(100 * d);
    const std::vector<float> more_keys = head_rows(k2, h);
    const std::vector<float> more_values = head_rows(v2, h);
    keys.insert(keys.end(), more_keys.begin(), more_keys.end());
    values.insert(values.end(), more_values.begin(), more_values.end());
    const Expected expected = kivi_reference(kivi, keys, values, 200);
    REQUIRE(matrix(child_now.keys[h]) == expected.keys);
    REQUIRE(matrix(child_now.values[h]) == expected.values);
  }

  // Truncate the child to 100: keys 0..99 stay in their groups (group 3 partial), the groups
  // past it go, and nothing waits in fp32 any more.
  cache.truncate(child, 100);
  const kvc::DenseLayer cut = cache.export_dense(child, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    REQUIRE(cut.keys[h] == child_now.keys[h].topRows(100));
    REQUIRE(cut.values[h] == child_now.values[h].topRows(100));
  }
  const std::size_t per_head =
      100 * kivi.key_bytes(d) + 4 * kivi.key_group_bytes(d) + 100 * kivi.value_bytes(d);
  REQUIRE(cache.stats(child).code_bytes == 2 * per_head);
  const Tensor3 q = random_tensor(rng, 8, 1, d);
  Tensor3 out(8, 1, d);
  cache.attend(child, 0, q.view(), out.mutable_view());
  REQUIRE(kvc::test::attend_error(cache, child, 0, q, out) < attend_tolerance);
  cache.close(child);
  cache.close(parent);
  REQUIRE(cache.stats().pages_in_use == 0);
}

TEST_CASE("kivi: composes with H2O, SnapKV and D2O merging", "[quant][kivi][cache]") {
  using Kivi4 = kvc::quant::Kivi<4, group, residual>;
  kvc::test::check_composes_over_decode(kvc::evict::H2O{}, Kivi4{}, false, attend_tolerance);
  kvc::test::check_composes_over_decode(kvc::evict::SnapKV({.window = 16}), Kivi4{}, true,
                                        attend_tolerance);
  kvc::test::check_composes_over_decode(kvc::evict::D2O<>{}, Kivi4{}, false, attend_tolerance);
  // 8-bit codes (0..255) in the same cache: attend within the same bound.
  kvc::test::check_composes_over_decode(kvc::evict::H2O{}, kvc::quant::Kivi<8, group, residual>{},
                                        false, attend_tolerance);
}

TEST_CASE("kivi: bad input is rejected before anything is stored", "[quant][kivi][cache]") {
  kvc::KvCache<kvc::evict::Full, Kivi2> cache(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  Tensor3 k(2, 3, d);
  Tensor3 v(2, 3, d);
  k.at(1, 2, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(cache.append(seq, 0, k.view(), v.view()), kvc::ValueError);
  k.at(1, 2, 5) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(cache.append(seq, 0, k.view(), v.view()), kvc::ValueError);
  k.at(1, 2, 5) = 0.0F;
  v.at(0, 0, 0) = 70000.0F;  // beyond fp16: the parameters could not hold it
  CHECK_THROWS_WITH(cache.append(seq, 0, k.view(), v.view()),
                    Catch::Contains("70000") && Catch::Contains("kivi2"));
  CHECK(cache.tokens(seq, 0, 0) == 0);
  CHECK(cache.stats().code_bytes == 0);
  const kvc::Geometry odd{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 48};
  CHECK_THROWS_AS((kvc::KvCache<kvc::evict::Full, Kivi2>(odd)), kvc::UnsupportedError);
}

TEST_CASE("kivi: the byte unpacking of the integer path equals the float one", "[quant][kivi]") {
  std::mt19937 rng(31);
  std::uniform_int_distribution<int> byte(0, 255);
  const auto check = [&](auto codes_of_bits) {
    using Codes = decltype(codes_of_bits);
    for (const std::size_t channels : {std::size_t{32}, std::size_t{64}, std::size_t{128}}) {
      std::vector<std::byte> packed(Codes::packed_bytes(channels));
      for (std::byte& b : packed) b = static_cast<std::byte>(byte(rng));
      std::vector<std::int8_t> as_bytes(channels);
      std::vector<float> as_floats(channels);
      Codes::widen(packed.data(), channels, as_bytes.data());
      Codes::widen(packed.data(), channels, as_floats.data());
      for (std::size_t c = 0; c < channels; ++c) {
        // Compared as unsigned bytes: 8-bit codes reach 255 (Kivi<8> keeps the fp32 path).
        const auto code = static_cast<std::uint8_t>(as_bytes[c]);
        REQUIRE(float(code) == as_floats[c]);
        REQUIRE(unsigned(code) == Codes::get(packed.data(), c, channels));
      }
    }
  };
  check(kvc::quant::detail::AsymmetricCodes<2>{});
  check(kvc::quant::detail::AsymmetricCodes<4>{});
  check(kvc::quant::detail::AsymmetricCodes<8>{});
}

TEST_CASE("kivi: encode packs each channel's code where get finds it, at any head_dim",
          "[quant][kivi]") {
  const auto check = [](auto codes_of_bits) {
    using Codes = decltype(codes_of_bits);
    // 2048 channels: planes of 512 (2-bit) / 1024 (4-bit) bytes, wider than encode's
    // 256-byte pieces.
    for (const std::size_t channels : {std::size_t{32}, std::size_t{128}, std::size_t{2048}}) {
      const auto code_of = [](std::size_t c) {
        return static_cast<unsigned>((c * 7 + c / 5) % (Codes::levels + 1));
      };
      std::vector<std::byte> packed(Codes::packed_bytes(channels), std::byte{0xff});
      Codes::encode(channels, packed.data(),
                    [&](std::size_t first, std::size_t count, std::uint8_t* q) {
                      REQUIRE(count <= 256);
                      // A piece never crosses a plane: planar packing needs whole planes.
                      const std::size_t plane = channels / Codes::per_byte;
                      REQUIRE(first / plane == (first + count - 1) / plane);
                      for (std::size_t j = 0; j < count; ++j) {
                        q[j] = static_cast<std::uint8_t>(code_of(first + j));
                      }
                    });
      for (std::size_t c = 0; c < channels; ++c) {
        INFO("channels " << channels << ", channel " << c);
        REQUIRE(Codes::get(packed.data(), c, channels) == code_of(c));
      }
    }
  };
  check(kvc::quant::detail::AsymmetricCodes<2>{});
  check(kvc::quant::detail::AsymmetricCodes<4>{});
  check(kvc::quant::detail::AsymmetricCodes<8>{});
}

TEST_CASE("kivi: fp16_at_most / fp16_at_least equal their portable references bit for bit",
          "[quant][kivi]") {
  using namespace kvc::quant::detail;
  std::mt19937 rng(12);
  std::uniform_int_distribution<std::uint32_t> bits;
  std::vector<float> values = {0.0F,      -0.0F,    1e-30F, -1e-30F, 5.96e-8F, -5.96e-8F, 65504.0F,
                               -65504.0F, 65519.0F, 1.0F,   -1.0F,   0.1F,     -0.1F};
  for (int i = 0; i < 200000; ++i) {
    const float v = std::bit_cast<float>(bits(rng));
    if (std::isfinite(v) && std::abs(v) <= 65504.0F) values.push_back(v);
  }
  for (const float v : values) {
    INFO("value " << v);
    REQUIRE(fp16_at_most(v) == fp16_at_most_reference(v));
    // Its defining property: an fp16 ≤ v whose next fp16 up is > v.
    REQUIRE(fp16_value(fp16_at_most(v)) <= v);
    if (v >= 0.0F) {
      REQUIRE(fp16_at_least(v) == fp16_at_least_reference(v));
      REQUIRE(fp16_value(fp16_at_least(v)) >= v);
    }
  }
}
