// Tests of tinyllm/model.hpp: the forward pass of random tiny Llamas (written by the test as
// config.json + safetensors) against a float64 re-implementation with full causal attention;
// chunked prefill against token-by-token decode; tied embeddings; sharded checkpoints; the
// calls the model makes on the cache; load and call errors.
#include <tinyllm/model.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_writer.hpp"

#include <kvc/core/kv_cache.hpp>
#include <kvc/runtime/any_cache.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace {

using Catch::Matchers::Contains;
using tinyllm::LoadError;
using tinyllm::Model;
using tinyllm::RowMatrix;
using tinyllm::test::MessageContains;
using tinyllm::test::TempDir;
using tinyllm::test::TinyLlama;
using Cache = kvc::CacheModel<kvc::KvCache<>>;  // Full scorer, Dense<float>

std::unique_ptr<Cache> make_cache(const Model& model) {
  return std::make_unique<Cache>("full", model.geometry());
}

// max |a − b| / max |b| over every logit.
double relative_error(const RowMatrix& logits, const std::vector<std::vector<double>>& reference) {
  double error = 0.0, scale = 0.0;
  for (std::size_t t = 0; t < reference.size(); ++t) {
    for (std::size_t i = 0; i < reference[t].size(); ++i) {
      const auto row = static_cast<Eigen::Index>(t), col = static_cast<Eigen::Index>(i);
      error = std::max(error, std::abs(double(logits(row, col)) - reference[t][i]));
      scale = std::max(scale, std::abs(reference[t][i]));
    }
  }
  return error / scale;
}

double relative_error(const RowMatrix& a, const RowMatrix& b) {
  return double((a - b).cwiseAbs().maxCoeff() / b.cwiseAbs().maxCoeff());
}

// Logits of `tokens` fed in chunks of the given sizes on a fresh sequence.
RowMatrix run_chunks(const Model& model, kvc::AnyCache& cache, const std::vector<int>& tokens,
                     const std::vector<std::size_t>& chunks) {
  const kvc::SequenceId seq = cache.open_sequence();
  RowMatrix logits(tokens.size(), model.config().vocab_size);
  std::size_t at = 0;
  for (std::size_t n : chunks) {
    model.forward(cache, seq, std::span<const int>(tokens).subspan(at, n),
                  logits.middleRows(static_cast<Eigen::Index>(at), static_cast<Eigen::Index>(n)));
    at += n;
  }
  REQUIRE(at == tokens.size());
  cache.close(seq);
  return logits;
}

// An AnyCache that forwards to a full cache and records what the model asks of it; it can
// be told to fail the append of one layer.
class RecordingCache final : public kvc::AnyCache {
 public:
  explicit RecordingCache(const kvc::Geometry& g) : inner_("full", g) {}

  std::vector<std::string> calls;
  std::size_t fail_append_at_layer = SIZE_MAX;

  const std::string& recipe() const noexcept override { return inner_.recipe(); }
  const kvc::Geometry& geometry() const noexcept override { return inner_.geometry(); }
  const kvc::CacheOptions& options() const noexcept override { return inner_.options(); }
  kvc::SequenceId open_sequence() override { return inner_.open_sequence(); }
  kvc::SequenceId fork(kvc::SequenceId parent) override { return inner_.fork(parent); }
  void close(kvc::SequenceId id) override { inner_.close(id); }
  bool is_open(kvc::SequenceId id) const noexcept override { return inner_.is_open(id); }
  void append(kvc::SequenceId id, std::size_t layer, kvc::View<const float, 3> k,
              kvc::View<const float, 3> v) override {
    calls.push_back(fmt::format("append {} {}", layer, k.extent(1)));
    if (layer == fail_append_at_layer) throw kvc::ValueError("test: append refused");
    inner_.append(id, layer, k, v);
  }
  void observe(kvc::SequenceId id, std::size_t layer, kvc::View<const float, 3> q) override {
    calls.push_back(fmt::format("observe {} {}", layer, q.extent(1)));
    inner_.observe(id, layer, q);
  }
  void attend(kvc::SequenceId id, std::size_t layer, kvc::View<const float, 3> q,
              kvc::View<float, 3> out) override {
    calls.push_back(fmt::format("attend {} {}", layer, q.extent(1)));
    inner_.attend(id, layer, q, out);
  }
  void compress(kvc::SequenceId id) override { inner_.compress(id); }
  void truncate(kvc::SequenceId id, std::size_t length) override {
    calls.push_back(fmt::format("truncate {}", length));
    inner_.truncate(id, length);
  }
  std::size_t tokens(kvc::SequenceId id, std::size_t layer, std::size_t head) const override {
    return inner_.tokens(id, layer, head);
  }
  std::size_t tokens_seen(kvc::SequenceId id, std::size_t layer) const override {
    return inner_.tokens_seen(id, layer);
  }
  kvc::CacheStats stats() const override { return inner_.stats(); }
  kvc::CacheStats stats(kvc::SequenceId id) const override { return inner_.stats(id); }

 private:
  Cache inner_;
};

const std::vector<int> kTokens = {3, 14, 15, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2};

}  // namespace

TEST_CASE("forward equals a float64 Llama with full causal attention", "[tinyllm][model]") {
  const std::string dtype = GENERATE(as<std::string>{}, "F32", "BF16");
  TempDir dir;
  const TinyLlama tiny = TinyLlama::random(TinyLlama::tiny_config(), 11, dtype);
  tiny.write(dir.path());
  const Model model = Model::load(dir.path());
  CHECK(model.config() == tiny.config);
  CHECK(model.geometry() == kvc::Geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 8});
  CHECK(model.parameter_count() == 16 * 32 * 2 + 32 + 2 * (2 * 32 + 3 * 32 * 32 + 3 * 48 * 32));

  const auto cache = make_cache(model);
  const RowMatrix logits = run_chunks(model, *cache, kTokens, {kTokens.size()});
  const auto reference = tiny.reference_logits(kTokens);
  const double error = relative_error(logits, reference);
  INFO(dtype << ": relative error " << error);
  CHECK(error < 1e-4);
  // Not vacuous: positions disagree with each other and logits are O(1).
  CHECK(std::abs(reference[0][0] - reference[1][0]) > 1e-2);
  CHECK(logits.cwiseAbs().maxCoeff() > 1.0F);
}

TEST_CASE("chunked prefill equals token-by-token decode", "[tinyllm][model]") {
  TempDir dir;
  const TinyLlama tiny = TinyLlama::random(TinyLlama::tiny_config(), 12);
  tiny.write(dir.path());
  const Model model = Model::load(dir.path());
  const auto cache = make_cache(model);

  const RowMatrix whole = run_chunks(model, *cache, kTokens, {kTokens.size()});
  const RowMatrix one_by_one = run_chunks(model, *cache, kTokens, std::vector<std::size_t>(20, 1));
  const RowMatrix mixed = run_chunks(model, *cache, kTokens, {7, 1, 1, 5, 6});
  CHECK(relative_error(one_by_one, whole) < 1e-5);
  CHECK(relative_error(mixed, whole) < 1e-5);
  CHECK(relative_error(whole, tiny.reference_logits(kTokens)) < 1e-4);

  // forward_last: the last row of the same pass, chunk by chunk.
  const kvc::SequenceId seq = cache->open_sequence();
  std::vector<float> last(model.config().vocab_size);
  std::size_t at = 0;
  for (std::size_t n : {9, 1, 10}) {
    model.forward_last(*cache, seq, std::span<const int>(kTokens).subspan(at, n), last);
    at += n;
    const auto expected = whole.row(static_cast<Eigen::Index>(at - 1));
    for (std::size_t i = 0; i < last.size(); ++i) {
      CHECK(last[i] == Approx(expected(static_cast<Eigen::Index>(i))).margin(1e-5).epsilon(1e-5));
    }
  }
  CHECK(cache->tokens_seen(seq, 1) == kTokens.size());
}

TEST_CASE("sequences of one cache are independent", "[tinyllm][model]") {
  TempDir dir;
  TinyLlama::random(TinyLlama::tiny_config(), 13).write(dir.path());
  const Model model = Model::load(dir.path());
  const auto cache = make_cache(model);
  const RowMatrix alone = run_chunks(model, *cache, kTokens, {kTokens.size()});

  const kvc::SequenceId a = cache->open_sequence(), b = cache->open_sequence();
  RowMatrix logits(kTokens.size(), model.config().vocab_size);
  RowMatrix other(5, model.config().vocab_size);
  const std::span<const int> tokens(kTokens);
  model.forward(*cache, a, tokens.first(8), logits.topRows(8));
  model.forward(*cache, b, std::vector<int>{1, 1, 1, 1, 1}, other);  // interleaved
  model.forward(*cache, a, tokens.subspan(8), logits.bottomRows(12));
  CHECK(relative_error(logits, alone) < 1e-6);
}

TEST_CASE("tied embeddings reuse the embedding as the output head", "[tinyllm][model]") {
  auto config = TinyLlama::tiny_config();
  config.tie_word_embeddings = true;
  config.num_key_value_heads = 1;  // GQA group of 4
  const std::string dtype = GENERATE(as<std::string>{}, "F32", "F16");
  TempDir dir;
  TinyLlama tiny = TinyLlama::random(config, 14, dtype);
  REQUIRE(tiny.weights.count("lm_head.weight") == 0);
  SECTION("no lm_head.weight in the file") {
    tiny.write(dir.path());
  }
  SECTION("a stray lm_head.weight is ignored, as HF does") {
    TinyLlama with_head = tiny;
    with_head.weights["lm_head.weight"] = {dtype, {16, 32}, std::vector<float>(16 * 32, 9.0F)};
    with_head.write(dir.path());
  }
  const Model model = Model::load(dir.path());
  CHECK(model.config().tie_word_embeddings);
  const auto cache = make_cache(model);
  const RowMatrix logits = run_chunks(model, *cache, kTokens, {4, 16});
  CHECK(relative_error(logits, tiny.reference_logits(kTokens)) < 1e-4);
}

TEST_CASE("a sharded checkpoint loads like a single file", "[tinyllm][model]") {
  TempDir single, sharded;
  const TinyLlama tiny = TinyLlama::random(TinyLlama::tiny_config(), 15, "BF16");
  tiny.write(single.path());
  tiny.write_sharded(sharded.path(), 3);
  const Model a = Model::load(single.path()), b = Model::load(sharded.path());
  const auto cache = make_cache(a);
  // Same weights, same math; only the weights' addresses differ, and Eigen's kernels may
  // peel differently for other alignments, so the sums may round differently (not bit-equal).
  CHECK(relative_error(run_chunks(a, *cache, kTokens, {20}), run_chunks(b, *cache, kTokens, {20})) <
        1e-6);
}

TEST_CASE("forward appends, observes the chunk's tail, then attends, per layer",
          "[tinyllm][model]") {
  TempDir dir;
  TinyLlama::random(TinyLlama::tiny_config(), 16).write(dir.path());
  Model model = Model::load(dir.path());
  CHECK(model.observe_window() == 64);
  model.set_observe_window(4);
  RecordingCache cache(model.geometry());
  const kvc::SequenceId seq = cache.open_sequence();
  std::vector<float> logits(16);
  model.forward_last(cache, seq, std::span<const int>(kTokens).first(10), logits);
  CHECK(cache.calls == std::vector<std::string>{"append 0 10", "observe 0 4", "attend 0 10",
                                                "append 1 10", "observe 1 4", "attend 1 10"});
  cache.calls.clear();
  model.forward_last(cache, seq, std::span<const int>(kTokens).subspan(10, 2), logits);
  CHECK(cache.calls == std::vector<std::string>{"append 0 2", "observe 0 2", "attend 0 2",
                                                "append 1 2", "observe 1 2", "attend 1 2"});
  cache.calls.clear();
  model.forward_last(cache, seq, std::span<const int>(kTokens).subspan(12, 1), logits);
  CHECK(cache.calls ==
        std::vector<std::string>{"append 0 1", "attend 0 1", "append 1 1", "attend 1 1"});
  cache.calls.clear();
  model.set_observe_window(0);
  model.forward_last(cache, seq, std::span<const int>(kTokens).subspan(13, 3), logits);
  CHECK(cache.calls ==
        std::vector<std::string>{"append 0 3", "attend 0 3", "append 1 3", "attend 1 3"});
}

TEST_CASE("a pass the cache rejects midway leaves the sequence at its old length",
          "[tinyllm][model]") {
  TempDir dir;
  TinyLlama::random(TinyLlama::tiny_config(), 17).write(dir.path());
  const Model model = Model::load(dir.path());
  RecordingCache cache(model.geometry());
  const kvc::SequenceId seq = cache.open_sequence();
  std::vector<float> logits(16);
  model.forward_last(cache, seq, std::span<const int>(kTokens).first(5), logits);
  cache.fail_append_at_layer = 1;  // layer 0 takes the chunk, layer 1 refuses it
  CHECK_THROWS_MATCHES(
      model.forward_last(cache, seq, std::span<const int>(kTokens).subspan(5, 3), logits),
      kvc::ValueError, MessageContains("append refused"));
  CHECK(cache.calls.back() == "truncate 5");
  CHECK(cache.tokens_seen(seq, 0) == 5);
  CHECK(cache.tokens_seen(seq, 1) == 5);
  // The sequence goes on as if the failed call never happened.
  cache.fail_append_at_layer = SIZE_MAX;
  model.forward_last(cache, seq, std::span<const int>(kTokens).subspan(5, 15), logits);
  const auto plain = make_cache(model);
  const RowMatrix expected = run_chunks(model, *plain, kTokens, {20});
  for (std::size_t i = 0; i < logits.size(); ++i) {
    CHECK(logits[i] == Approx(expected(19, static_cast<Eigen::Index>(i))).margin(1e-5));
  }
}

TEST_CASE("forward rejects bad calls before touching the cache", "[tinyllm][model]") {
  TempDir dir;
  TinyLlama::random(TinyLlama::tiny_config(), 18).write(dir.path());
  const Model model = Model::load(dir.path());
  const auto cache = make_cache(model);
  const kvc::SequenceId seq = cache->open_sequence();
  std::vector<float> logits(16);
  RowMatrix matrix(2, 16);

  CHECK_THROWS_MATCHES(model.forward_last(*cache, seq, std::vector<int>{1, 16}, logits),
                       std::invalid_argument,
                       MessageContains("tokens[1] is 16, outside the vocabulary [0, 16)"));
  CHECK_THROWS_MATCHES(model.forward_last(*cache, seq, std::vector<int>{-1}, logits),
                       std::invalid_argument, MessageContains("tokens[0] is -1"));
  CHECK_THROWS_MATCHES(model.forward_last(*cache, seq, std::vector<int>{}, logits),
                       std::invalid_argument, MessageContains("no tokens"));
  CHECK_THROWS_MATCHES(
      model.forward_last(*cache, seq, std::vector<int>{1}, std::span<float>(logits).first(15)),
      std::invalid_argument, MessageContains("logits has 15 floats, expected vocab_size 16"));
  CHECK_THROWS_MATCHES(model.forward(*cache, seq, std::vector<int>{1, 2, 3}, matrix),
                       std::invalid_argument,
                       MessageContains("logits is [2][16], expected [3][16]"));
  Cache other("full", kvc::Geometry{.layers = 2, .q_heads = 4, .kv_heads = 4, .head_dim = 8});
  const kvc::SequenceId other_seq = other.open_sequence();
  CHECK_THROWS_MATCHES(model.forward_last(other, other_seq, std::vector<int>{1}, logits),
                       std::invalid_argument,
                       MessageContains("the cache has 2 layers, 4 query / 4 kv"));
  CHECK(cache->tokens_seen(seq, 0) == 0);
  CHECK(cache->tokens_seen(seq, 1) == 0);

  cache->close(seq);
  CHECK_THROWS_AS(model.forward_last(*cache, seq, std::vector<int>{1}, logits), kvc::SequenceError);
}

TEST_CASE("load names the missing or malformed tensor", "[tinyllm][model]") {
  TempDir dir;
  TinyLlama tiny = TinyLlama::random(TinyLlama::tiny_config(), 19);
  const auto require_error = [&](const std::vector<std::string>& fragments) {
    try {
      Model::load(dir.path());
      FAIL("no LoadError");
    } catch (const LoadError& e) {
      const std::string message = e.what();
      INFO(message);
      CHECK_THAT(message, Contains(dir.path().string()));
      for (const auto& fragment : fragments) CHECK_THAT(message, Contains(fragment));
    }
  };
  SECTION("no config.json") {
    tiny.write(dir.path());
    std::filesystem::remove(dir / "config.json");
    require_error({"config.json: cannot open"});
  }
  SECTION("no weights") {
    tinyllm::test::write_text(dir / "config.json", tiny.config_json().dump());
    require_error({"neither model.safetensors nor model.safetensors.index.json"});
  }
  SECTION("missing tensor") {
    tiny.weights.erase("model.layers.1.mlp.up_proj.weight");
    tiny.write(dir.path());
    require_error({"model.safetensors", "no tensor 'model.layers.1.mlp.up_proj.weight'"});
  }
  SECTION("missing lm_head without tied embeddings") {
    tiny.weights.erase("lm_head.weight");
    tiny.write(dir.path());
    require_error({"no tensor 'lm_head.weight'", "tie_word_embeddings false"});
  }
  SECTION("transposed weight") {
    tiny.weights["model.layers.0.self_attn.k_proj.weight"].shape = {32, 16};
    tiny.write(dir.path());
    require_error({"tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 16]",
                   "config.json expects [16, 32]"});
  }
  SECTION("config and weights of different sizes") {
    tiny.config.vocab_size = 20;
    tiny.write(dir.path());
    require_error({"'model.embed_tokens.weight' has shape [16, 32]", "expects [20, 32]"});
  }
  SECTION("non-finite weight") {
    tiny.weights["model.norm.weight"].values[7] = std::nanf("");
    tiny.write(dir.path());
    require_error({"tensor 'model.norm.weight' holds nan at flat index 7"});
  }
  SECTION("dtype tinyllm does not read") {
    tiny.weights["model.norm.weight"].dtype = "F64";
    tiny.write(dir.path());
    require_error({"tensor 'model.norm.weight' has dtype F64; tinyllm reads F32, F16 and BF16"});
  }
  SECTION("sharded: tensor absent from the weight_map") {
    tiny.write_sharded(dir.path(), 2);
    auto index = nlohmann::json::parse(
        std::ifstream(dir / "model.safetensors.index.json", std::ios::binary));
    index["weight_map"].erase("model.norm.weight");
    tinyllm::test::write_text(dir / "model.safetensors.index.json", index.dump());
    require_error(
        {"model.safetensors.index.json", "no tensor 'model.norm.weight' in the weight_map"});
  }
  SECTION("sharded: a shard path outside the directory") {
    tiny.write_sharded(dir.path(), 2);
    auto index = nlohmann::json::parse(
        std::ifstream(dir / "model.safetensors.index.json", std::ios::binary));
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors";
    tinyllm::test::write_text(dir / "model.safetensors.index.json", index.dump());
    require_error({"'model.norm.weight' maps to \"../elsewhere.safetensors\"", "not a file name"});
  }
}
