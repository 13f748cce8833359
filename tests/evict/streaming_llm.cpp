// Tests of kvc/evict/streaming_llm.hpp: sinks + recent window, exact sets and bytes.
#include <kvc/evict/streaming_llm.hpp>

#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <numeric>
#include <random>

namespace {

using kvc::test::random_tensor;
using Streaming = kvc::KvCache<kvc::evict::StreamingLLM>;

std::vector<kvc::Position> iota(kvc::Position first, kvc::Position last) {
  std::vector<kvc::Position> positions(static_cast<std::size_t>(last - first + 1));
  std::iota(positions.begin(), positions.end(), first);
  return positions;
}

std::vector<kvc::Position> concat(std::vector<kvc::Position> a,
                                  const std::vector<kvc::Position>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

TEST_CASE("StreamingLLM scores sinks +inf and others by position", "[streaming_llm]") {
  kvc::evict::StreamingLLM scorer({.sink = 2});
  const std::vector<kvc::Position> positions{0, 1, 5, 9};
  std::vector<float> scores(4);
  scorer.score({}, kvc::ScoreContext{0, 0, positions, 3, 10}, scores);
  CHECK(std::isinf(scores[0]));
  CHECK(std::isinf(scores[1]));
  CHECK(scores[2] == 5.0F);
  CHECK(scores[3] == 9.0F);
}

TEST_CASE("StreamingLLM keeps exactly the sinks and the newest tokens", "[streaming_llm]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(1);
  Streaming cache(geometry, {.budget = kvc::Budget::tokens(10), .page_tokens = 4},
                  kvc::evict::StreamingLLM({.sink = 4}));
  const auto seq = cache.open_sequence();
  kvc::test::Tensor3 out(4, 25, 64);

  // Prefill 25 tokens: after attend, each head holds sinks 0..3 and the newest 6 (19..24).
  for (std::size_t l = 0; l < 2; ++l) {
    cache.append(seq, l, random_tensor(rng, 2, 25, 64).view(),
                 random_tensor(rng, 2, 25, 64).view());
    cache.attend(seq, l, random_tensor(rng, 4, 25, 64).view(), out.mutable_view());
  }
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t h = 0; h < 2; ++h) {
      CHECK(cache.positions(seq, l, h) == concat(iota(0, 3), iota(19, 24)));
    }
  }
  // 10 tokens per head in pages of 4 → 3 pages per head, 12 pages in all.
  CHECK(cache.stats().pages_in_use == 2 * 2 * 3);
  CHECK(cache.stats().tokens_stored == 2 * 2 * 10);

  // Decode: every step keeps the window sliding, sinks fixed.
  kvc::test::Tensor3 step_out(4, 1, 64);
  for (int step = 0; step < 7; ++step) {
    for (std::size_t l = 0; l < 2; ++l) {
      cache.append(seq, l, random_tensor(rng, 2, 1, 64).view(),
                   random_tensor(rng, 2, 1, 64).view());
      cache.attend(seq, l, random_tensor(rng, 4, 1, 64).view(), step_out.mutable_view());
    }
  }
  CHECK(cache.positions(seq, 1, 1) == concat(iota(0, 3), iota(26, 31)));
  CHECK(cache.tokens_seen(seq, 0) == 32);
}

TEST_CASE("StreamingLLM with a ratio budget, and without attend", "[streaming_llm]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(2);
  Streaming cache(geometry, {.budget = kvc::Budget::ratio(0.25), .page_tokens = 8});
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, random_tensor(rng, 1, 100, 64).view(),
               random_tensor(rng, 1, 100, 64).view());
  // A host that never calls attend: compression happens before the next append.
  CHECK(cache.tokens(seq, 0, 0) == 100);
  cache.append(seq, 0, random_tensor(rng, 1, 1, 64).view(), random_tensor(rng, 1, 1, 64).view());
  // ceil(0.25 × 100) = 25 survivors (4 sinks + 21 newest of 0..99), then token 100 appended.
  CHECK(cache.positions(seq, 0, 0) == concat(concat(iota(0, 3), iota(79, 99)), {100}));
  cache.compress(seq);
  // ceil(0.25 × 101) = 26: nothing more to evict.
  CHECK(cache.tokens(seq, 0, 0) == 26);
}

TEST_CASE("StreamingLLM's bytes shrink with the budget", "[streaming_llm]") {
  const kvc::Geometry geometry{.layers = 4, .q_heads = 8, .kv_heads = 4, .head_dim = 128};
  std::mt19937 rng(3);
  std::vector<std::size_t> held;
  for (std::size_t budget : {1024, 256, 64}) {
    Streaming cache(geometry, {.budget = kvc::Budget::tokens(budget)});
    const auto seq = cache.open_sequence();
    for (std::size_t l = 0; l < 4; ++l) {
      cache.append(seq, l, random_tensor(rng, 4, 1024, 128).view(),
                   random_tensor(rng, 4, 1024, 128).view());
    }
    cache.compress(seq);
    const auto stats = cache.stats();
    CHECK(stats.tokens_stored == 4 * 4 * budget);
    CHECK(stats.code_bytes == 4 * 4 * budget * 2 * 128 * sizeof(float));
    const std::size_t page = cache.options().page_tokens;
    CHECK(stats.pages_in_use == 4 * 4 * ((budget + page - 1) / page));
    held.push_back(stats.bytes_held());
  }
  // Budgets 1024 → 256 → 64 of 1024 tokens: page bytes scale 4× each time (pages of ≤ 64).
  CHECK(held[0] > 3 * held[1]);
  CHECK(held[1] > 3 * held[2]);
}

TEST_CASE("StreamingLLM attend equals exact attention over the kept tokens", "[streaming_llm]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(4);
  Streaming cache(geometry, {.budget = kvc::Budget::tokens(40)});
  const auto seq = cache.open_sequence();
  kvc::test::Tensor3 out(8, 1, 64);
  for (int step = 0; step < 60; ++step) {
    cache.append(seq, 0, random_tensor(rng, 2, 1, 64).view(), random_tensor(rng, 2, 1, 64).view());
    const auto q = random_tensor(rng, 8, 1, 64);
    cache.attend(seq, 0, q.view(), out.mutable_view());
    // attend ran on the ≤ 41 tokens stored before compression; the reference runs on what
    // is stored after it, so compare only while nothing was evicted by this step.
    if (step < 40) CHECK(kvc::test::attend_error(cache, seq, 0, q, out) < 1e-4);
  }
  CHECK(cache.tokens(seq, 0, 0) == 40);
}
