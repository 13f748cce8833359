// tinyllm/eval.hpp — the measurements of kvc-eval and kvc-demo, on a real model.
//
// Every task runs the model's forward pass with every layer's attention going through the
// cache under test (an AnyCache built from a recipe string), exactly as an engine would:
//
//   perplexity        prefill `prompt` held-out tokens in one chunk (prefill-time eviction
//                     happens here), then teacher-force the next `decode` tokens one step at a
//                     time (decode-time eviction counts) and score their negative
//                     log-likelihood. Also yields decode ms/token and the bytes held.
//   attention error   the same teacher-forced run, but the model runs on a full cache and the
//                     cache under test shadows it (same K/V, same queries): the relative L2
//                     error of every attention output, isolated from the drift of the
//                     compressed model's own hidden states.
//   passkey           the training format ("There is a pass key hidden in this text...");
//                     a 5-digit key at a given depth of held-out prose, asked at the end;
//                     the whole prompt, question included, is one prefill chunk; greedy decode
//                     of 5 bytes must equal the key.
//   passkey, 2nd      the same prompts, but an unrelated first query (64 bytes of other
//                     prose) is prefilled with the context and the passkey question comes
//                     after, on the cache compressed for the first query (SCBench's point).
//   multi-query       SCBench-style shared context: a list of key→value pairs and one lookup
//                     are prefilled (and compressed) together, then further lookups follow on
//                     the same compressed cache, each answered greedily and then
//                     teacher-forced. A method that keeps only what the first query needed
//                     scores well on query 1 and fails on the rest.
#pragma once

#include <tinyllm/model.hpp>
#include <tinyllm/sample.hpp>

#include <kvc/runtime/any_cache.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace tinyllm::eval {

using Tokens = std::vector<int>;

inline Tokens bytes_of(std::string_view text) {
  Tokens tokens(text.size());
  std::transform(text.begin(), text.end(), tokens.begin(),
                 [](char c) { return static_cast<int>(static_cast<unsigned char>(c)); });
  return tokens;
}

inline std::string text_of(std::span<const int> tokens) {
  std::string text(tokens.size(), '\0');
  std::transform(tokens.begin(), tokens.end(), text.begin(),
                 [](int t) { return static_cast<char>(static_cast<unsigned char>(t)); });
  return text;
}

// A text as token ids: a `.ids` file holds whitespace-separated decimal ids (made by
// tokenize_ids.py for a model with its own tokenizer); any other file is read as bytes,
// which are the token ids of the shipped byte-level model.
inline Tokens read_tokens(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  if (path.extension() == ".ids") {
    Tokens tokens;
    for (long id; in >> id;) {
      if (id < 0 || id > std::numeric_limits<int>::max()) {
        throw std::runtime_error(path.string() + ": token id " + std::to_string(id) +
                                 " out of range");
      }
      tokens.push_back(static_cast<int>(id));
    }
    if (!in.eof()) throw std::runtime_error(path.string() + ": not a list of token ids");
    return tokens;
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bytes_of(text);
}

// One sequence of `model` on `cache`: feeds tokens, hands back the last position's logits.
class Session {
 public:
  Session(const Model& model, kvc::AnyCache& cache)
      : model_(model), cache_(cache), seq_(cache.open_sequence()) {}
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() { cache_.close(seq_); }

  kvc::SequenceId sequence() const noexcept { return seq_; }
  std::size_t tokens_seen() const { return cache_.tokens_seen(seq_, 0); }
  void truncate(std::size_t length) { cache_.truncate(seq_, length); }

  // Runs `tokens` as one chunk; returns the logits of its last position.
  std::span<const float> feed(std::span<const int> tokens) {
    logits_.resize(model_.config().vocab_size);
    model_.forward_last(cache_, seq_, tokens, logits_);
    return logits_;
  }
  std::span<const float> feed(int token) { return feed(std::span<const int>(&token, 1)); }

  // Greedy decode of `count` tokens after `last_logits`; every generated token is fed back.
  Tokens greedy(std::span<const float> last_logits, std::size_t count) {
    Tokens out;
    std::vector<float> logits(last_logits.begin(), last_logits.end());
    for (std::size_t i = 0; i < count; ++i) {
      out.push_back(tinyllm::argmax(logits));
      if (i + 1 < count) {
        const auto next = feed(out.back());
        logits.assign(next.begin(), next.end());
      }
    }
    return out;
  }

 private:
  const Model& model_;
  kvc::AnyCache& cache_;
  kvc::SequenceId seq_;
  std::vector<float> logits_;
};

inline double log_softmax_at(std::span<const float> logits, int token) {
  double max = logits[0];
  for (float x : logits) max = std::max(max, static_cast<double>(x));
  double sum = 0.0;
  for (float x : logits) sum += std::exp(static_cast<double>(x) - max);
  return static_cast<double>(logits[static_cast<std::size_t>(token)]) - max - std::log(sum);
}

// ---- perplexity, decode speed, bytes ------------------------------------------------------

struct PerplexityResult {
  double perplexity = 0.0;
  double decode_ms_per_token = 0.0;
  std::size_t tokens_seen = 0;
  kvc::CacheStats stats;  // of the sequence, after the last decode step
};

// Prefill text[0, prompt), then teacher-force text[prompt, prompt + decode).
inline PerplexityResult perplexity(const Model& model, kvc::AnyCache& cache,
                                   std::span<const int> text, std::size_t prompt,
                                   std::size_t decode) {
  if (text.size() < prompt + decode + 1) {
    throw std::invalid_argument(
        "perplexity: the text has " + std::to_string(text.size()) +
        " tokens, prompt + decode + 1 = " + std::to_string(prompt + decode + 1) + " are needed");
  }
  Session session(model, cache);
  auto logits = session.feed(text.first(prompt));
  double nll = 0.0;
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < decode; ++i) {
    const int next = text[prompt + i];
    nll -= log_softmax_at(logits, next);
    logits = session.feed(next);
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  PerplexityResult result;
  result.perplexity = std::exp(nll / static_cast<double>(decode));
  result.decode_ms_per_token = ms / static_cast<double>(decode);
  result.tokens_seen = prompt + decode;
  result.stats = cache.stats(session.sequence());
  return result;
}

// ---- attention-output error (shadow cache) ------------------------------------------------

// An AnyCache that is a full cache for the model and feeds the same K/V and queries to a
// cache under test, accumulating Σ‖out_test − out_full‖² and Σ‖out_full‖² over attends.
class ShadowCache final : public kvc::AnyCache {
 public:
  ShadowCache(kvc::AnyCache& reference, kvc::AnyCache& test) : reference_(reference), test_(test) {}

  double relative_error() const noexcept {
    return reference_norm_ > 0.0 ? std::sqrt(error_norm_ / reference_norm_) : 0.0;
  }
  // Only attends after this is set count (e.g. decode steps, not the prefill).
  void set_measuring(bool measuring) noexcept { measuring_ = measuring; }

  const std::string& recipe() const noexcept override { return test_.recipe(); }
  const kvc::Geometry& geometry() const noexcept override { return reference_.geometry(); }
  const kvc::CacheOptions& options() const noexcept override { return reference_.options(); }
  kvc::SequenceId open_sequence() override {
    const auto id = reference_.open_sequence();
    pairs_.push_back({id, test_.open_sequence()});
    return id;
  }
  kvc::SequenceId fork(kvc::SequenceId parent) override {
    const auto id = reference_.fork(parent);
    pairs_.push_back({id, test_.fork(partner(parent))});
    return id;
  }
  void close(kvc::SequenceId id) override {
    test_.close(partner(id));
    reference_.close(id);
    std::erase_if(pairs_, [&](const Pair& p) { return p.reference == id; });
  }
  bool is_open(kvc::SequenceId id) const noexcept override { return reference_.is_open(id); }
  void append(kvc::SequenceId id, std::size_t layer, kvc::View<const float, 3> k,
              kvc::View<const float, 3> v) override {
    reference_.append(id, layer, k, v);
    test_.append(partner(id), layer, k, v);
  }
  void observe(kvc::SequenceId id, std::size_t layer, kvc::View<const float, 3> q) override {
    reference_.observe(id, layer, q);
    test_.observe(partner(id), layer, q);
  }
  void attend(kvc::SequenceId id, std::size_t layer, kvc::View<const float, 3> q,
              kvc::View<float, 3> out) override {
    reference_.attend(id, layer, q, out);
    scratch_.resize(out.extent(0) * out.extent(1) * out.extent(2));
    kvc::View<float, 3> test_out(scratch_.data(), {out.extent(0), out.extent(1), out.extent(2)});
    test_.attend(partner(id), layer, q, test_out);
    if (!measuring_) return;
    for (std::size_t h = 0; h < out.extent(0); ++h) {
      for (std::size_t t = 0; t < out.extent(1); ++t) {
        for (std::size_t d = 0; d < out.extent(2); ++d) {
          const double ref = out(h, t, d), diff = test_out(h, t, d) - ref;
          error_norm_ += diff * diff;
          reference_norm_ += ref * ref;
        }
      }
    }
  }
  void compress(kvc::SequenceId id) override {
    reference_.compress(id);
    test_.compress(partner(id));
  }
  void truncate(kvc::SequenceId id, std::size_t length) override {
    reference_.truncate(id, length);
    test_.truncate(partner(id), length);
  }
  std::size_t tokens(kvc::SequenceId id, std::size_t layer, std::size_t h) const override {
    return reference_.tokens(id, layer, h);
  }
  std::size_t tokens_seen(kvc::SequenceId id, std::size_t layer) const override {
    return reference_.tokens_seen(id, layer);
  }
  kvc::CacheStats stats() const override { return reference_.stats(); }
  kvc::CacheStats stats(kvc::SequenceId id) const override { return reference_.stats(id); }

 private:
  struct Pair {
    kvc::SequenceId reference, test;
  };
  kvc::SequenceId partner(kvc::SequenceId id) const {
    for (const Pair& p : pairs_) {
      if (p.reference == id) return p.test;
    }
    throw std::invalid_argument("ShadowCache: unknown sequence");
  }

  kvc::AnyCache& reference_;
  kvc::AnyCache& test_;
  std::vector<Pair> pairs_;
  std::vector<float> scratch_;
  double error_norm_ = 0.0, reference_norm_ = 0.0;
  bool measuring_ = false;
};

// Relative L2 error of the attention outputs over the teacher-forced decode steps.
inline double attention_error(const Model& model, kvc::AnyCache& full, kvc::AnyCache& test,
                              std::span<const int> text, std::size_t prompt, std::size_t decode) {
  ShadowCache shadow(full, test);
  Session session(model, shadow);
  session.feed(text.first(prompt));
  shadow.set_measuring(true);
  for (std::size_t i = 0; i < decode; ++i) session.feed(text[prompt + i]);
  return shadow.relative_error();
}

// ---- passkey ------------------------------------------------------------------------------

struct PasskeyPrompt {
  Tokens prompt;  // context, then the question
  Tokens key;
  std::size_t question_at = 0;  // where the question starts in prompt
};

inline std::string random_digits(std::size_t count, std::mt19937& rng) {
  std::uniform_int_distribution<int> digit(0, 9);
  std::string text(count, '0');
  for (char& c : text) c = static_cast<char>('0' + digit(rng));
  return text;
}

// The training format of examples/tinyllm/train.py (passkey_sample): `length` tokens in all,
// prompt + 5 key digits + '.'.
inline PasskeyPrompt passkey_prompt(std::span<const int> filler_text, std::size_t length,
                                    double depth, std::mt19937& rng) {
  const std::string key = random_digits(5, rng);
  const std::string head = "There is a pass key hidden in this text. Remember it.\n";
  const std::string needle =
      " The pass key is " + key + ". Remember it. " + key + " is the pass key. ";
  const std::string question = "\nWhat is the pass key? The pass key is ";
  const std::size_t fixed = head.size() + needle.size() + question.size() + key.size() + 1;
  if (length <= fixed || filler_text.size() < length) {
    throw std::invalid_argument("passkey_prompt: length " + std::to_string(length) +
                                " does not fit the template or the filler text");
  }
  const std::size_t filler = length - fixed;
  const std::size_t start =
      std::uniform_int_distribution<std::size_t>(0, filler_text.size() - filler)(rng);
  const auto cut = static_cast<std::size_t>(static_cast<double>(filler) * depth);
  PasskeyPrompt result;
  auto append = [&](std::span<const int> part) {
    result.prompt.insert(result.prompt.end(), part.begin(), part.end());
  };
  append(bytes_of(head));
  append(filler_text.subspan(start, cut));
  append(bytes_of(needle));
  append(filler_text.subspan(start + cut, filler - cut));
  result.question_at = result.prompt.size();
  append(bytes_of(question));
  result.key = bytes_of(key);
  return result;
}

inline bool passkey_trial(const Model& model, kvc::AnyCache& cache, const PasskeyPrompt& p) {
  Session session(model, cache);
  return session.greedy(session.feed(p.prompt), p.key.size()) == p.key;
}

// The needle asked second: the context and an unrelated first query (`other`: prose the
// model reads, as a user turn about something else would be) are one prefill chunk, so a
// query-aware method compresses for that query; the passkey question comes after, on the
// compressed cache. SnapKV-style selection that scores perfectly when the question is the
// window can fail here: the multi-query failure mode SCBench measures.
inline bool passkey_second_trial(const Model& model, kvc::AnyCache& cache, const PasskeyPrompt& p,
                                 std::span<const int> other) {
  Session session(model, cache);
  Tokens first(p.prompt.begin(), p.prompt.begin() + static_cast<std::ptrdiff_t>(p.question_at));
  first.push_back('\n');
  first.insert(first.end(), other.begin(), other.end());
  session.feed(first);
  const std::span<const int> question = std::span<const int>(p.prompt).subspan(p.question_at);
  return session.greedy(session.feed(question), p.key.size()) == p.key;
}

// ---- multi-query over one shared, compressed context --------------------------------------

struct LookupContext {
  Tokens context;                                  // the list of pairs + "Now the lookups.\n"
  std::vector<std::pair<Tokens, Tokens>> queries;  // ("key K = value ", "VVVVV")
};

inline LookupContext lookup_context(std::size_t length, std::size_t queries, std::mt19937& rng) {
  auto digits = [&] { return random_digits(5, rng); };
  std::vector<std::pair<std::string, std::string>> pairs;
  std::string text = "A list of keys and their values.\n";
  const std::size_t reserve = queries * 26 + 25;
  while (text.size() + 30 < length - std::min(length, reserve)) {
    auto key = digits();
    if (std::any_of(pairs.begin(), pairs.end(), [&](const auto& p) { return p.first == key; })) {
      continue;
    }
    pairs.emplace_back(key, digits());
    text += "key " + key + " = value " + pairs.back().second + ".\n";
  }
  text += "Now the lookups.\n";
  LookupContext result{bytes_of(text), {}};
  std::shuffle(pairs.begin(), pairs.end(), rng);
  for (std::size_t i = 0; i < std::min(queries, pairs.size()); ++i) {
    result.queries.emplace_back(bytes_of("key " + pairs[i].first + " = value "),
                                bytes_of(pairs[i].second));
  }
  return result;
}

// Hits per query index: the context and the first query are one prefill chunk; each later
// query is appended to the same (compressed) sequence after the previous (true) answer.
inline std::vector<bool> multi_query_trial(const Model& model, kvc::AnyCache& cache,
                                           const LookupContext& c) {
  Session session(model, cache);
  std::vector<bool> hits;
  for (std::size_t i = 0; i < c.queries.size(); ++i) {
    const auto& [query, answer] = c.queries[i];
    Tokens chunk;
    if (i == 0) chunk = c.context;
    chunk.insert(chunk.end(), query.begin(), query.end());
    auto logits = session.feed(chunk);
    const std::size_t asked = session.tokens_seen();
    hits.push_back(session.greedy(logits, answer.size()) == answer);
    // Roll back what greedy fed and teacher-force the true answer, so every query starts
    // from the same transcript whatever was generated before it.
    session.truncate(asked);
    Tokens truth = answer;
    truth.push_back('.');
    truth.push_back('\n');
    session.feed(truth);
  }
  return hits;
}

// ---- one recipe, every measurement -------------------------------------------------------

struct Settings {
  std::size_t ppl_prompt = 1024, ppl_decode = 256;
  std::vector<std::size_t> passkey_lengths{512, 1024, 2000};
  std::vector<double> passkey_depths{0.0, 0.25, 0.5, 0.75, 1.0};
  std::size_t passkey_trials = 2;
  std::size_t other_query = 64;  // bytes of the unrelated first query (passkey asked second)
  std::size_t lookup_length = 1500, lookup_queries = 4, lookup_trials = 3;
  std::uint32_t seed = 2024;

  static Settings quick() {
    Settings s;
    s.ppl_prompt = 512;
    s.ppl_decode = 64;
    s.passkey_lengths = {1024};
    s.passkey_trials = 2;
    s.lookup_length = 1000;
    s.lookup_trials = 2;
    return s;
  }
};

struct Report {
  std::string recipe;
  double perplexity = 0.0;
  double perplexity_delta = 0.0;  // vs. the plain KvCache<> baseline
  double decode_ms_per_token = 0.0;
  double attention_error = 0.0;
  double passkey_accuracy = 0.0;
  double passkey_second_accuracy = 0.0;  // the same needles, asked after an unrelated query
  std::vector<std::vector<double>> passkey_grid;  // [length][depth] accuracy
  std::vector<double> multi_query;                // accuracy per query index
  std::size_t tokens_seen = 0, tokens_stored = 0, bytes_held = 0, dense_f16_bytes = 0;
  double bytes_per_token() const noexcept {
    return tokens_seen ? static_cast<double>(bytes_held) / static_cast<double>(tokens_seen) : 0.0;
  }
  double compression_ratio() const noexcept {
    return bytes_held ? static_cast<double>(dense_f16_bytes) / static_cast<double>(bytes_held)
                      : 1.0;
  }
};

// Builds a fresh cache for each trial (a trial never sees another's state).
using CacheFactory = std::function<std::unique_ptr<kvc::AnyCache>()>;
// (what is running, done, total) — kvc-eval draws its progress line from it.
using Progress = std::function<void(std::string_view, std::size_t, std::size_t)>;

inline Report evaluate(const Model& model, const std::string& recipe, const CacheFactory& make,
                       const CacheFactory& make_full, std::span<const int> heldout,
                       const Settings& settings, double baseline_perplexity,
                       const Progress& progress = {}) {
  Report report;
  report.recipe = recipe;
  std::mt19937 rng(settings.seed);
  const std::size_t cells = settings.passkey_lengths.size() * settings.passkey_depths.size();
  const std::size_t total = 2 + 2 * cells * settings.passkey_trials + settings.lookup_trials;
  std::size_t done = 0;
  auto tick = [&](std::string_view what) {
    if (progress) progress(what, done++, total);
  };

  tick("perplexity");
  {
    auto cache = make();
    const auto ppl = perplexity(model, *cache, heldout, settings.ppl_prompt, settings.ppl_decode);
    report.perplexity = ppl.perplexity;
    report.perplexity_delta = ppl.perplexity - baseline_perplexity;
    report.decode_ms_per_token = ppl.decode_ms_per_token;
    report.tokens_seen = ppl.stats.tokens_seen;
    report.tokens_stored = ppl.stats.tokens_stored;
    report.bytes_held = ppl.stats.bytes_held();
    report.dense_f16_bytes = ppl.stats.dense_f16_bytes();
  }
  tick("attention error");
  {
    auto full = make_full();
    auto cache = make();
    report.attention_error =
        attention_error(model, *full, *cache, heldout, settings.ppl_prompt, settings.ppl_decode);
  }
  std::size_t hits_total = 0, second_total = 0;
  std::uniform_int_distribution<std::size_t> other_start(0, heldout.size() - settings.other_query);
  for (std::size_t length : settings.passkey_lengths) {
    auto& row = report.passkey_grid.emplace_back();
    for (double depth : settings.passkey_depths) {
      std::size_t hits = 0;
      for (std::size_t t = 0; t < settings.passkey_trials; ++t) {
        tick("passkey");
        const auto prompt = passkey_prompt(heldout, length, depth, rng);
        auto cache = make();
        hits += passkey_trial(model, *cache, prompt);
        tick("passkey asked 2nd");
        auto second = make();
        second_total += passkey_second_trial(
            model, *second, prompt, heldout.subspan(other_start(rng), settings.other_query));
      }
      hits_total += hits;
      row.push_back(static_cast<double>(hits) / static_cast<double>(settings.passkey_trials));
    }
  }
  report.passkey_accuracy =
      static_cast<double>(hits_total) / static_cast<double>(cells * settings.passkey_trials);
  report.passkey_second_accuracy =
      static_cast<double>(second_total) / static_cast<double>(cells * settings.passkey_trials);
  report.multi_query.assign(settings.lookup_queries, 0.0);
  for (std::size_t t = 0; t < settings.lookup_trials; ++t) {
    tick("multi-query");
    const auto context = lookup_context(settings.lookup_length, settings.lookup_queries, rng);
    auto cache = make();
    const auto hits = multi_query_trial(model, *cache, context);
    for (std::size_t q = 0; q < hits.size(); ++q) {
      report.multi_query[q] += hits[q] ? 1.0 / static_cast<double>(settings.lookup_trials) : 0.0;
    }
  }
  return report;
}

}  // namespace tinyllm::eval
