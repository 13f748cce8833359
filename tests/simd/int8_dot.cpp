// Tests of kvc/simd/int8_dot.hpp: the integer kernels equal their references bit for bit
// (the sums are exact int32, the roundings defined), on random codes over the whole int8
// range, odd strides and token / row / chunk counts around the block sizes; and the
// references themselves on hand-computed cases.
#include <kvc/simd/int8_dot.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace {

std::vector<std::int8_t> random_codes(std::mt19937& rng, std::size_t n) {
  std::uniform_int_distribution<int> code(-128, 127);
  std::vector<std::int8_t> out(n);
  for (auto& x : out) x = static_cast<std::int8_t>(code(rng));
  return out;
}

// Random u8 weight rows per chunk (rows · tokens each) and the per-chunk pointers the
// accumulate kernels take: every chunk its own rows, or (shared) all chunks the first one's.
struct ChunkWeights {
  std::vector<std::vector<std::uint8_t>> rows;
  std::vector<const std::uint8_t*> pointers;
};
ChunkWeights random_chunk_weights(std::mt19937& rng, std::size_t chunks, std::size_t size,
                                  bool shared) {
  std::uniform_int_distribution<int> byte(0, 255);
  ChunkWeights w{std::vector<std::vector<std::uint8_t>>(chunks, std::vector<std::uint8_t>(size)),
                 std::vector<const std::uint8_t*>(chunks)};
  for (auto& row : w.rows) {
    for (auto& x : row) x = static_cast<std::uint8_t>(byte(rng));
  }
  for (std::size_t b = 0; b < chunks; ++b) w.pointers[b] = w.rows[shared ? 0 : b].data();
  return w;
}

}  // namespace

TEST_CASE("int8_dot references by hand", "[simd][int8_dot]") {
  SECTION("quantize_rows_s8: absmax scale, ties to even, zero rows") {
    // m = 2, scale 2/127; x·127/2: 1 → 63.5 → 64 (even), −2 → −127, 0.5 → 31.75 → 32.
    const std::vector<float> x{1.0F, -2.0F, 0.5F, 0.0F, 0.0F, 0.0F, 0.0F, 0.0F};
    std::vector<std::int8_t> codes(8, 99);
    float scales[2] = {-1.0F, -1.0F};
    kvc::simd::reference::quantize_rows_s8(x.data(), 2, 4, 4, codes.data(), scales);
    CHECK(scales[0] == 2.0F / 127.0F);
    CHECK(codes[0] == 64);
    CHECK(codes[1] == -127);
    CHECK(codes[2] == 32);
    CHECK(codes[3] == 0);
    CHECK(scales[1] == 0.0F);  // a zero row: scale 0, codes 0
    for (std::size_t c = 4; c < 8; ++c) CHECK(codes[c] == 0);
  }
  SECTION("quantize_weights_u8: against the maximum, 0 stays 0") {
    const std::vector<float> w{0.0F, 0.5F, 1.0F, 0.25F};
    std::vector<std::uint8_t> out(4);
    const float factor = kvc::simd::reference::quantize_weights_u8(w.data(), 4, out.data());
    CHECK(factor == 1.0F / 255.0F);
    CHECK(out[0] == 0);
    CHECK(out[1] == 128);  // 127.5 → 128 (ties to even)
    CHECK(out[2] == 255);
    CHECK(out[3] == 64);  // 63.75
    const std::vector<float> zeros(5, 0.0F);
    std::vector<std::uint8_t> none(5, 7);
    CHECK(kvc::simd::reference::quantize_weights_u8(zeros.data(), 5, none.data()) == 0.0F);
    for (auto x : none) CHECK(x == 0);
  }
  SECTION("dot_s8 and accumulate_u8s8 on small codes") {
    std::vector<std::int8_t> q(32, 0), k(2 * 40, 0);
    q[0] = 3;
    q[31] = -128;
    k[0] = 5;  // token 0
    k[31] = 2;
    k[40 + 0] = -7;  // token 1 (stride 40)
    k[40 + 31] = 127;
    std::int32_t dots[2];
    kvc::simd::dot_s8(q.data(), 1, 32, k.data(), 2, 40, dots, 2);
    CHECK(dots[0] == 3 * 5 + -128 * 2);
    CHECK(dots[1] == 3 * -7 + -128 * 127);

    const std::vector<std::uint8_t> w{2, 255};
    const std::uint8_t* chunks[1] = {w.data()};
    std::vector<std::int32_t> acc(32, -1);
    kvc::simd::accumulate_u8s8(chunks, 1, 2, k.data(), 2, 40, 1, 32, acc.data(), 32);
    CHECK(acc[0] == 2 * 5 + 255 * -7);
    CHECK(acc[31] == 2 * 2 + 255 * 127);
    CHECK(acc[1] == 0);
  }
}

TEST_CASE("quantize_rows_s8 and quantize_weights_u8 equal their references", "[simd][int8_dot]") {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (std::size_t d : {1, 7, 16, 31, 32, 33, 96, 128, 256}) {
    for (int kind = 0; kind < 4; ++kind) {
      std::vector<float> x(3 * (d + 5));
      for (auto& v : x) v = normal(rng);
      if (kind == 1) x[d / 2] = 1.0e6F;  // one outlier
      if (kind == 2)
        for (auto& v : x) v *= 1.0e-38F;  // denormal-range rows
      if (kind == 3)
        for (auto& v : x) v = std::round(v);  // ties
      std::vector<std::int8_t> got(3 * d), want(3 * d);
      float got_scales[3], want_scales[3];
      kvc::simd::quantize_rows_s8(x.data(), 3, d + 5, d, got.data(), got_scales);
      kvc::simd::reference::quantize_rows_s8(x.data(), 3, d + 5, d, want.data(), want_scales);
      CHECK(got == want);
      for (int r = 0; r < 3; ++r) CHECK(got_scales[r] == want_scales[r]);

      std::vector<float> w(d);
      for (auto& v : w) v = std::abs(x[&v - w.data()]);
      std::vector<std::uint8_t> got_w(d), want_w(d);
      const float got_factor = kvc::simd::quantize_weights_u8(w.data(), d, got_w.data());
      const float want_factor =
          kvc::simd::reference::quantize_weights_u8(w.data(), d, want_w.data());
      CHECK(got_w == want_w);
      CHECK(got_factor == want_factor);
    }
  }
}

TEST_CASE("dot_s8 equals its reference over the whole int8 range", "[simd][int8_dot]") {
  std::mt19937 rng(5);
  for (std::size_t d : {32, 64, 96, 128, 256}) {
    for (std::size_t rows : {1, 3, 4, 5, 9}) {
      for (std::size_t tokens : {0, 1, 3, 4, 5, 13, 64}) {
        const std::size_t ldk = d + 4;  // Int8<>'s row: scale + codes, never aligned
        const auto q = random_codes(rng, rows * d);
        const auto k = random_codes(rng, tokens * ldk + 1);
        std::vector<std::int32_t> got(rows * (tokens + 2), 77), want(rows * (tokens + 2), 77);
        kvc::simd::dot_s8(q.data(), rows, d, k.data() + 1, tokens, ldk, got.data(), tokens + 2);
        kvc::simd::reference::dot_s8(q.data(), rows, d, k.data() + 1, tokens, ldk, want.data(),
                                     tokens + 2);
        INFO("d " << d << " rows " << rows << " tokens " << tokens);
        CHECK(got == want);  // the padding columns stay untouched in both
      }
    }
  }
}

TEST_CASE("accumulate_u8s8 equals its reference for shared and per-chunk weights",
          "[simd][int8_dot]") {
  std::mt19937 rng(7);
  for (std::size_t chunks : {1, 2, 3, 4, 8}) {
    for (std::size_t chunk_stride : {32, 34}) {  // Int8 rows and q8_0 blocks
      for (bool shared : {true, false}) {
        for (std::size_t rows : {1, 4, 6}) {
          for (std::size_t tokens : {0, 1, 2, 3, 4, 7, 64}) {
            const std::size_t ldv = chunks * chunk_stride + 6;
            const auto v = random_codes(rng, tokens * ldv + 2);
            const auto w = random_chunk_weights(rng, chunks, rows * tokens + 1, shared);
            const auto& pointers = w.pointers;
            const std::size_t ldacc = chunks * 32 + 3;
            std::vector<std::int32_t> got(rows * ldacc, -5), want(rows * ldacc, -5);
            kvc::simd::accumulate_u8s8(pointers.data(), rows, tokens, v.data() + 2, tokens, ldv,
                                       chunks, chunk_stride, got.data(), ldacc);
            kvc::simd::reference::accumulate_u8s8(pointers.data(), rows, tokens, v.data() + 2,
                                                  tokens, ldv, chunks, chunk_stride, want.data(),
                                                  ldacc);
            INFO("chunks " << chunks << " stride " << chunk_stride << " shared " << shared
                           << " rows " << rows << " tokens " << tokens);
            CHECK(got == want);
          }
        }
      }
    }
  }
}

TEST_CASE("int8_dot: the extreme sums stay exact in int32", "[simd][int8_dot]") {
  // 256 channels of −128 · −128 and 64 tokens of 255 · −128: the largest magnitudes the
  // quantizers can produce, far from 2^31.
  const std::vector<std::int8_t> q(256, -128), k(256, -128);
  std::int32_t dot = 0;
  kvc::simd::dot_s8(q.data(), 1, 256, k.data(), 1, 256, &dot, 1);
  CHECK(dot == 256 * 128 * 128);
  const std::vector<std::int8_t> v(64 * 32, -128);
  const std::vector<std::uint8_t> w(64, 255);
  const std::uint8_t* chunks[1] = {w.data()};
  std::vector<std::int32_t> acc(32);
  kvc::simd::accumulate_u8s8(chunks, 1, 64, v.data(), 64, 32, 1, 32, acc.data(), 32);
  for (auto x : acc) CHECK(x == 64 * 255 * -128);
}

TEST_CASE("dot_planar equals its reference for 2- and 4-bit planar codes", "[simd][int8_dot]") {
  std::mt19937 rng(9);
  const auto check = [&]<unsigned Bits>(std::size_t d) {
    for (std::size_t rows : {1, 2, 3, 4, 5, 9}) {
      for (std::size_t tokens : {0, 1, 3, 4, 5, 13, 64}) {
        const std::size_t ldk = d * Bits / 8 + 3;  // rows never aligned
        const auto q = random_codes(rng, rows * d);
        const auto bytes = random_codes(rng, tokens * ldk + 1);
        const auto* k = reinterpret_cast<const std::uint8_t*>(bytes.data()) + 1;
        std::vector<std::int32_t> got(rows * (tokens + 2), 77), want(rows * (tokens + 2), 77);
        kvc::simd::dot_planar<Bits>(q.data(), rows, d, k, tokens, ldk, got.data(), tokens + 2);
        kvc::simd::reference::dot_planar<Bits>(q.data(), rows, d, k, tokens, ldk, want.data(),
                                               tokens + 2);
        INFO("bits " << Bits << " d " << d << " rows " << rows << " tokens " << tokens);
        CHECK(got == want);
      }
    }
  };
  // Whole 32-byte planes (the VNNI path where the target has it), and head dims that fall
  // back to the reference (2-bit d = 64: 16-byte planes).
  for (std::size_t d : {128, 256}) check.operator()<2>(d);
  for (std::size_t d : {64, 128, 192, 256}) check.operator()<4>(d);
  check.operator()<2>(64);
  CHECK(kvc::simd::dot_planar_fits<2>(128) == kvc::simd::has_int8_dot);
  CHECK(!kvc::simd::dot_planar_fits<2>(64));
}

TEST_CASE("dot_planar reference reads Kivi's planar layout (hand-built)", "[simd][int8_dot]") {
  // 2 bits, d = 128: byte i holds channels i, 32 + i, 64 + i, 96 + i (low bits first).
  std::vector<std::uint8_t> k(32, 0);
  k[5] = 0b11'10'01'00;  // channel 5: 0, 37: 1, 69: 2, 101: 3
  std::vector<std::int8_t> q(128, 0);
  q[5] = 100;
  q[37] = 7;
  q[69] = -3;
  q[101] = 2;
  std::int32_t dot = 0;
  kvc::simd::reference::dot_planar<2>(q.data(), 1, 128, k.data(), 1, 32, &dot, 1);
  CHECK(dot == 0 * 100 + 1 * 7 + 2 * -3 + 3 * 2);
}

TEST_CASE("accumulate_planar equals its reference for 2- and 4-bit planar codes",
          "[simd][int8_dot]") {
  std::mt19937 rng(11);
  const auto check = [&]<unsigned Bits>(std::size_t d) {
    const std::size_t chunks = d / 32;
    for (bool shared : {true, false}) {
      for (std::size_t rows : {1, 3, 4, 6}) {
        for (std::size_t tokens : {0, 1, 3, 4, 5, 13, 64}) {
          const std::size_t ldv = d * Bits / 8 + 5;  // rows never aligned
          const auto bytes = random_codes(rng, tokens * ldv + 1);
          const auto* v = reinterpret_cast<const std::uint8_t*>(bytes.data()) + 1;
          const auto w = random_chunk_weights(rng, chunks, rows * tokens + 1, shared);
          const auto& pointers = w.pointers;
          const std::size_t ldacc = d + 3;
          std::vector<std::int32_t> got(rows * ldacc, -5), want(rows * ldacc, -5);
          kvc::simd::accumulate_planar<Bits>(pointers.data(), rows, tokens, v, tokens, ldv, d,
                                             got.data(), ldacc);
          kvc::simd::reference::accumulate_planar<Bits>(pointers.data(), rows, tokens, v, tokens,
                                                        ldv, d, want.data(), ldacc);
          INFO("bits " << Bits << " d " << d << " shared " << shared << " rows " << rows
                       << " tokens " << tokens);
          CHECK(got == want);  // the padding columns stay untouched in both
        }
      }
    }
  };
  // Planes of 32 bytes (both chunks of a pair from the same bytes), of 64 and 128 (a pair
  // from consecutive bytes), of 96 (4-bit d = 192: a pair that wraps to the next plane), and a
  // head dim that falls back to the reference (2-bit d = 64: 16-byte planes).
  for (std::size_t d : {128, 256}) check.operator()<2>(d);
  for (std::size_t d : {64, 128, 192, 256}) check.operator()<4>(d);
  check.operator()<2>(64);
}

TEST_CASE("accumulate_planar reference reads Kivi's planar layout (hand-built)",
          "[simd][int8_dot]") {
  // 2 bits, d = 128: byte 5 holds channels 5, 37, 69, 101 (low bits first); two tokens.
  std::vector<std::uint8_t> v(2 * 32, 0);
  v[5] = 0b11'10'01'00;       // token 0: channel 5: 0, 37: 1, 69: 2, 101: 3
  v[32 + 5] = 0b01'01'11'10;  // token 1: channel 5: 2, 37: 3, 69: 1, 101: 1
  const std::uint8_t weights[4][2] = {{10, 20}, {30, 40}, {50, 60}, {70, 80}};
  const std::uint8_t* chunks[4] = {weights[0], weights[1], weights[2], weights[3]};
  std::vector<std::int32_t> acc(128, -1);
  kvc::simd::reference::accumulate_planar<2>(chunks, 1, 2, v.data(), 2, 32, 128, acc.data(), 128);
  CHECK(acc[5] == 10 * 0 + 20 * 2);
  CHECK(acc[37] == 30 * 1 + 40 * 3);
  CHECK(acc[69] == 50 * 2 + 60 * 1);
  CHECK(acc[101] == 70 * 3 + 80 * 1);
  CHECK(acc[6] == 0);
  std::vector<std::int32_t> fast(128, -1);
  kvc::simd::accumulate_planar<2>(chunks, 1, 2, v.data(), 2, 32, 128, fast.data(), 128);
  CHECK(fast == acc);
}
