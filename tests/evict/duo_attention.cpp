// Tests of kvc/evict/duo_attention.hpp: HeadRoles (table, pattern, the roles file and its
// errors, save/load), the scorer's scores, calibrate_head_roles on constructed attention
// and its errors. The cache-level behaviour with budget::DuoAttention is in
// tests/budget/duo_attention.cpp.
#include <kvc/evict/duo_attention.hpp>

#include <kvc/core/concepts.hpp>

#include <catch2/catch.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using kvc::evict::calibrate_head_roles;
using kvc::evict::DuoAttention;
using kvc::evict::HeadRole;
using kvc::evict::HeadRoles;

static_assert(kvc::EvictionScorer<DuoAttention>);
static_assert(!kvc::ConsumesAttention<DuoAttention>);
static_assert(!kvc::ObservesQueries<DuoAttention>);

constexpr float inf = std::numeric_limits<float>::infinity();

std::string error_of(const auto& call) {
  try {
    call();
  } catch (const kvc::Error& error) {
    return error.what();
  }
  return "(no error)";
}

std::filesystem::path temporary(const std::string& name) {
  return std::filesystem::temp_directory_path() /
         ("kvc_test_duo_" + std::to_string(std::random_device{}()) + "_" + name);
}

}  // namespace

TEST_CASE("HeadRoles parses the roles file: comments, spaces and CRLF", "[duo_attention]") {
  const HeadRoles roles = HeadRoles::parse(
      "# roles of a 3-layer model\n"
      "\n"
      "R S R S   # layer 0\r\n"
      "  SSRR\n"
      "# a comment line between layers\n"
      "\tRRRR");
  REQUIRE(roles.layers() == 3);
  REQUIRE(roles.kv_heads() == 4);
  CHECK_FALSE(roles.is_pattern());
  const std::vector<std::string> expected{"RSRS", "SSRR", "RRRR"};
  for (std::size_t l = 0; l < 3; ++l) {
    for (std::size_t h = 0; h < 4; ++h) {
      CAPTURE(l, h);
      CHECK(roles.retrieval(l, h) == (expected[l][h] == 'R'));
    }
  }
  CHECK(roles.count(HeadRole::retrieval) == 8);
  CHECK(roles.count(HeadRole::streaming) == 4);
  // Heads outside the table keep everything.
  CHECK(roles.retrieval(3, 0));
  CHECK(roles.retrieval(0, 4));
  // to_string writes a comment and one line per layer, and reads back equal.
  const std::string text = roles.to_string();
  CHECK(text.substr(text.find('\n') + 1) == "RSRS\nSSRR\nRRRR\n");
  CHECK(HeadRoles::parse(text) == roles);
}

TEST_CASE("HeadRoles parse errors name the line, the column and the character", "[duo_attention]") {
  CHECK_THROWS_AS(HeadRoles::parse("RS\nRx\n"), kvc::ValueError);
  CHECK(error_of([] { HeadRoles::parse("# c\nRS\nRx\n"); }) ==
        "HeadRoles::parse: line 3, column 2: 'x' is not a role; expected 'R' (retrieval), "
        "'S' (streaming), '#' (comment) or a space");
  // Lower case is not a role either; a control byte is shown in hex.
  CHECK_THROWS_AS(HeadRoles::parse("rs\n"), kvc::ValueError);
  CHECK_THAT(error_of([] { HeadRoles::parse("R\x01S\n"); }),
             Catch::Contains("line 1, column 2: byte 0x01"));
  // A '\r' anywhere but at the end of the line is an error too.
  CHECK_THROWS_AS(HeadRoles::parse("R\rS\n"), kvc::ValueError);

  CHECK_THROWS_AS(HeadRoles::parse("RSRS\nSSR\n"), kvc::ShapeError);
  CHECK(error_of([] { HeadRoles::parse("# x\nRSRS\n\nSSR # short\n"); }) ==
        "HeadRoles::parse: line 4 has 3 kv heads, line 2 (layer 0) has 4");
  CHECK_THROWS_AS(HeadRoles::parse(""), kvc::ShapeError);
  CHECK_THAT(error_of([] { HeadRoles::parse("# only a comment\n  \n"); }),
             Catch::Contains("no layer line"));
}

TEST_CASE("HeadRoles save and load round-trip through a file", "[duo_attention]") {
  HeadRoles roles(4, 2, HeadRole::streaming);
  roles.set(0, 1, HeadRole::retrieval);
  roles.set(3, 0, HeadRole::retrieval);
  const auto path = temporary("roles.txt");
  roles.save(path);
  CHECK(HeadRoles::load(path) == roles);
  {
    std::ofstream bad(path, std::ios::trunc);
    bad << "RS\nSS\nRZ\n";
  }
  CHECK_THROWS_AS(HeadRoles::load(path), kvc::ValueError);
  CHECK_THAT(error_of([&] { HeadRoles::load(path); }),
             Catch::Contains("HeadRoles::load: '" + path.string() + "': line 3, column 2: 'Z'"));
  std::filesystem::remove(path);
  CHECK_THROWS_AS(HeadRoles::load(path), kvc::Error);
  CHECK_THAT(error_of([&] { HeadRoles::load(path); }), Catch::Contains("cannot open"));
  CHECK_THROWS_AS(roles.save(path / "no" / "such" / "dir"), kvc::Error);
}

TEST_CASE("HeadRoles tables, patterns and set", "[duo_attention]") {
  const HeadRoles every_other = HeadRoles::alternating(2);
  CHECK(every_other.is_pattern());
  CHECK(every_other.retrieval(0, 0));
  CHECK_FALSE(every_other.retrieval(0, 1));
  CHECK_FALSE(every_other.retrieval(1, 0));
  CHECK(every_other.retrieval(1, 1));
  CHECK(every_other.retrieval(7, 1));
  CHECK(every_other.table(2, 3) == HeadRoles::parse("RSR\nSRS\n"));
  CHECK(HeadRoles::alternating(3).table(2, 3) == HeadRoles::parse("RSS\nSSR\n"));
  CHECK(HeadRoles::alternating(1).table(1, 2) == HeadRoles::parse("RR"));
  CHECK_THROWS_AS(HeadRoles::alternating(0), kvc::ValueError);
  CHECK_THROWS_AS(every_other.to_string(), kvc::UnsupportedError);
  HeadRoles pattern = every_other;
  CHECK_THROWS_AS(pattern.set(0, 0, HeadRole::streaming), kvc::UnsupportedError);

  HeadRoles table(2, 2);  // streaming by default
  CHECK(table.count(HeadRole::streaming) == 4);
  CHECK_THROWS_AS(table.set(2, 0, HeadRole::retrieval), kvc::ShapeError);
  CHECK_THAT(error_of([&] { table.set(0, 2, HeadRole::retrieval); }),
             Catch::Contains("head (0, 2) is outside the 2 × 2 table"));
  // The empty table: every head is retrieval.
  CHECK(HeadRoles{}.retrieval(0, 0));
}

TEST_CASE("DuoAttention scores retrieval heads +inf and streaming heads sinks + position",
          "[duo_attention]") {
  const DuoAttention scorer(HeadRoles::parse("RS\n"), {.sink = 2});
  const std::vector<kvc::Position> positions{0, 1, 2, 7, 9};
  std::vector<float> scores(5);
  scorer.score({}, kvc::ScoreContext{0, 0, positions, 3, 10}, scores);
  CHECK(scores == std::vector<float>{inf, inf, inf, inf, inf});
  scorer.score({}, kvc::ScoreContext{0, 1, positions, 3, 10}, scores);
  CHECK(scores == std::vector<float>{inf, inf, 2, 7, 9});
  // The defaults: sink 64, every other head retrieval.
  const DuoAttention defaults;
  CHECK(defaults.options().sink == 64);
  CHECK(defaults.roles() == HeadRoles::alternating(2));
}

namespace {

// One calibration event: `group` query heads × `window` rows over `tokens` tokens; row r's
// weights put `far` on token `far_position`, `sink` on token 0 and the rest on the row's
// own query token.
struct Calibration {
  std::vector<float> weights;
  kvc::ObserveEvent event;
};

Calibration calibration(std::size_t layer, std::size_t kv_head, std::size_t group,
                        std::size_t window, std::size_t tokens, std::size_t far_position, float far,
                        float sink) {
  Calibration c;
  c.weights.assign(group * window * tokens, 0.0F);
  for (std::size_t r = 0; r < group * window; ++r) {
    float* row = c.weights.data() + r * tokens;
    const std::size_t query = tokens - window + r % window;
    row[far_position] += far;
    row[0] += sink;
    row[query] += 1.0F - far - sink;
  }
  c.event = kvc::ObserveEvent{layer, kv_head, {}, group * window, window, tokens};
  return c;
}

}  // namespace

TEST_CASE("calibrate_head_roles makes the heads with the most long-range mass retrieval",
          "[duo_attention]") {
  // 2 layers × 3 kv heads, 40 tokens, window 4, group 2, sink 2, recent 8. Long-range
  // positions for the query at q: 2 ≤ p ≤ q − 8. Token 10 is long-range for every query
  // (q ≥ 36); token 30 only for q ≥ 38 (half of the rows); token 1 is a sink.
  std::vector<Calibration> heads;
  heads.push_back(calibration(0, 0, 2, 4, 40, 10, 0.3F, 0.5F));  // 0.3
  heads.push_back(calibration(0, 1, 2, 4, 40, 1, 0.6F, 0.2F));   // 0   (sink)
  heads.push_back(calibration(0, 2, 2, 4, 40, 30, 0.8F, 0.1F));  // 0.4 (half the rows)
  heads.push_back(calibration(1, 0, 2, 4, 40, 35, 0.9F, 0.0F));  // 0   (recent)
  heads.push_back(calibration(1, 1, 2, 4, 40, 2, 0.5F, 0.1F));   // 0.5 (first non-sink)
  heads.push_back(calibration(1, 2, 2, 4, 40, 10, 0.1F, 0.1F));  // 0.1
  std::vector<kvc::ObserveEvent> events;
  for (Calibration& c : heads) {
    c.event.weights = c.weights;
    events.push_back(c.event);
  }
  const kvc::evict::CalibrationOptions options{.sink = 2, .recent = 8, .retrieval_fraction = 0.5};
  const std::vector<double> mass{0.3, 0.0, 0.4, 0.0, 0.5, 0.1};
  for (std::size_t i = 0; i < 6; ++i) {
    CAPTURE(i);
    CHECK(kvc::evict::long_range_mass(events[i], 2, 8) == Approx(mass[i]).margin(1e-6));
  }
  // Half of 6: the three largest masses, 0.5 (1, 1), 0.4 (0, 2) and 0.3 (0, 0).
  CHECK(calibrate_head_roles(events, 2, 3, options) == HeadRoles::parse("RSR\nSRS\n"));
  // The order of the events does not matter.
  std::vector<kvc::ObserveEvent> reversed(events.rbegin(), events.rend());
  CHECK(calibrate_head_roles(reversed, 2, 3, options) == HeadRoles::parse("RSR\nSRS\n"));
  // A third: the two largest. None, all.
  auto fraction = options;
  fraction.retrieval_fraction = 1.0 / 3.0;
  CHECK(calibrate_head_roles(events, 2, 3, fraction) == HeadRoles::parse("SSR\nSRS\n"));
  fraction.retrieval_fraction = 0.0;
  CHECK(calibrate_head_roles(events, 2, 3, fraction) == HeadRoles(2, 3, HeadRole::streaming));
  fraction.retrieval_fraction = 1.0;
  CHECK(calibrate_head_roles(events, 2, 3, fraction) == HeadRoles(2, 3, HeadRole::retrieval));
  // Ties (the two zero-mass heads) go to the lower (layer, kv head): 5 of 6 leaves (1, 0).
  fraction.retrieval_fraction = 5.0 / 6.0;
  CHECK(calibrate_head_roles(events, 2, 3, fraction) == HeadRoles::parse("RRR\nSRR\n"));
  // A wider recent window (16) makes token 30 recent for every query: head (0, 2) drops.
  auto wide = options;
  wide.recent = 16;
  CHECK(kvc::evict::long_range_mass(events[2], 2, 16) == 0.0);
  CHECK(calibrate_head_roles(events, 2, 3, wide) == HeadRoles::parse("RSS\nSRR\n"));
}

TEST_CASE("calibrate_head_roles rejects bad fractions and missing or malformed heads",
          "[duo_attention]") {
  std::vector<Calibration> heads;
  for (std::size_t h = 0; h < 2; ++h) heads.push_back(calibration(0, h, 1, 2, 10, 3, 0.5F, 0.0F));
  std::vector<kvc::ObserveEvent> events;
  for (Calibration& c : heads) {
    c.event.weights = c.weights;
    events.push_back(c.event);
  }
  CHECK_NOTHROW(calibrate_head_roles(events, 1, 2));
  CHECK_THROWS_AS(calibrate_head_roles(events, 1, 2, {.retrieval_fraction = 1.5}), kvc::ValueError);
  CHECK_THROWS_AS(
      calibrate_head_roles(events, 1, 2,
                           {.retrieval_fraction = std::numeric_limits<double>::quiet_NaN()}),
      kvc::ValueError);
  CHECK_THROWS_AS(calibrate_head_roles(events, 1, 3), kvc::ShapeError);  // a head missing
  CHECK_THROWS_AS(calibrate_head_roles(events, 0, 2), kvc::ShapeError);
  auto duplicate = events;
  duplicate[1].kv_head = 0;
  CHECK_THAT(error_of([&] { calibrate_head_roles(duplicate, 1, 2); }),
             Catch::Contains("two events for layer 0 kv head 0"));
  auto outside = events;
  outside[1].layer = 1;
  CHECK_THROWS_AS(calibrate_head_roles(outside, 1, 2), kvc::ShapeError);
  auto short_weights = events;
  short_weights[0].weights = short_weights[0].weights.first(5);
  CHECK_THROWS_AS(calibrate_head_roles(short_weights, 1, 2), kvc::ShapeError);
  auto ragged = events;
  ragged[0].window = 3;  // 2 rows are not a multiple of a window of 3
  CHECK_THROWS_AS(calibrate_head_roles(ragged, 1, 2), kvc::ShapeError);
  std::vector<float> nan_weights(heads[0].weights);
  nan_weights[2] = std::numeric_limits<float>::quiet_NaN();
  auto with_nan = events;
  with_nan[0].weights = nan_weights;
  CHECK_THROWS_AS(calibrate_head_roles(with_nan, 1, 2, {.sink = 0, .recent = 1}), kvc::ValueError);
  CHECK_NOTHROW(calibrate_head_roles(events, 1, 2, {.sink = 0, .recent = 1}));
}
