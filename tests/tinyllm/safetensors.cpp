// Tests of tinyllm/safetensors.hpp: F32/F16/BF16 round trips through a test-side writer, and
// every malformed file the reader must reject with a LoadError naming the file, the tensor and
// the bad values.
#include <tinyllm/safetensors.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_writer.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using Catch::Matchers::Contains;
using tinyllm::LoadError;
using tinyllm::SafetensorsFile;
using tinyllm::test::MessageContains;
using tinyllm::test::TempDir;
using tinyllm::test::write_raw;
using tinyllm::test::write_safetensors;

// Opening `path` throws a LoadError whose message holds the file name and every fragment.
void require_load_error(const std::filesystem::path& path,
                        const std::vector<std::string>& fragments) {
  try {
    SafetensorsFile file(path);
    FAIL("no LoadError for " << path);
  } catch (const LoadError& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK_THAT(message, Contains(path.string()));
    for (const std::string& fragment : fragments) CHECK_THAT(message, Contains(fragment));
  }
}

}  // namespace

TEST_CASE("safetensors round-trips F32, F16 and BF16 values", "[tinyllm][safetensors]") {
  TempDir dir;
  const float inf = std::numeric_limits<float>::infinity();
  // Exactly representable in each format: extremes, subnormals, signed zero, infinities.
  const std::vector<float> f32 = {0.0F, -0.0F, 1.0F / 3.0F, -1e-40F, 3.4e38F, -inf, 7.25F, 1e-7F};
  const std::vector<float> f16 = {65504.0F, -65504.0F, std::ldexp(1.0F, -24), 0.5F, -1.5F, inf};
  const std::vector<float> bf16 = {
      3.140625F, -std::ldexp(1.0F, 100), std::ldexp(1.0F, -133), 1.0F, -inf, 0.0F};
  // Not representable: the writer rounds to nearest even, the reader must give that back.
  const std::vector<float> rounded = {0.1F, -2.7182817F, 1000.3F};
  write_safetensors(dir / "t.safetensors",
                    {{"f32", {"F32", {2, 4}, f32}},
                     {"f16", {"F16", {3, 2}, f16}},
                     {"bf16", {"BF16", {6}, bf16}},
                     {"f16_rounded", {"F16", {3}, rounded}},
                     {"bf16_rounded", {"BF16", {1, 3}, rounded}},
                     {"scalar", {"F32", {}, {42.0F}}},
                     {"empty", {"BF16", {0, 5}, {}}}},
                    {{"format", "pt"}});

  const SafetensorsFile file(dir / "t.safetensors");
  CHECK(file.tensors().size() == 7);  // __metadata__ is not a tensor
  CHECK_FALSE(file.contains("__metadata__"));
  CHECK(file.info("f32").shape == std::vector<std::size_t>{2, 4});
  CHECK(file.info("f16").dtype == "F16");
  CHECK(file.info("scalar").elements() == 1);
  CHECK(file.info("empty").elements() == 0);

  const auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      INFO("element " << i << ": " << a[i] << " vs " << b[i]);
      CHECK(std::signbit(a[i]) == std::signbit(b[i]));
      CHECK((a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i]))));
    }
  };
  same_bits(file.read("f32"), f32);
  same_bits(file.read("f16"), f16);
  same_bits(file.read("bf16"), bf16);
  same_bits(file.read("f16_rounded"),
            {static_cast<float>(Eigen::half(0.1F)), static_cast<float>(Eigen::half(-2.7182817F)),
             static_cast<float>(Eigen::half(1000.3F))});
  same_bits(file.read("bf16_rounded"), {static_cast<float>(Eigen::bfloat16(0.1F)),
                                        static_cast<float>(Eigen::bfloat16(-2.7182817F)),
                                        static_cast<float>(Eigen::bfloat16(1000.3F))});
  CHECK(file.read("f16_rounded")[2] == 1000.5F);  // f16 spacing at 1000 is 0.5
  CHECK(file.read("scalar") == std::vector<float>{42.0F});
  CHECK(file.read("empty").empty());

  std::vector<float> wrong_size(3);
  CHECK_THROWS_AS(file.read("f32", wrong_size), std::invalid_argument);
}

TEST_CASE("safetensors accepts gaps and a whitespace-padded header", "[tinyllm][safetensors]") {
  TempDir dir;
  std::vector<std::uint8_t> data(24, 0);
  data[8 + 3] = 0x3F;  // float 0.5 at byte 8: 00 00 00 3F
  const std::string header =
      R"({"b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},)"
      R"( "a": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}       )";
  write_raw(dir / "gap.safetensors", header, data);
  const SafetensorsFile file(dir / "gap.safetensors");
  CHECK(file.read("b") == std::vector<float>{0.5F});
  CHECK(file.data_size() == 24);
  // An I64 tensor opens, but tinyllm does not read it.
  CHECK_THROWS_MATCHES(file.read("a"), LoadError, MessageContains("'a' has dtype I64"));
}

TEST_CASE("safetensors rejects malformed files with the bad values", "[tinyllm][safetensors]") {
  TempDir dir;
  const auto path = dir / "bad.safetensors";
  const auto header_with = [](const std::string& entry) {
    return std::string(R"({"__metadata__": {"format": "pt"}, "w": )") + entry + "}";
  };

  SECTION("file shorter than the 8-byte length prefix") {
    tinyllm::test::write_text(path, "abcde");
    require_load_error(path, {"5 bytes", "shorter than the 8-byte header length"});
  }
  SECTION("header length past the end of the file") {
    write_raw(path, "{}", std::vector<std::uint8_t>(10), 1000);
    require_load_error(path, {"header length 1000", "12 bytes after the length prefix"});
  }
  SECTION("header length near 2^64") {
    write_raw(path, "{}", {}, ~std::uint64_t{0});
    require_load_error(path, {"header length 18446744073709551615"});
  }
  SECTION("malformed JSON") {
    write_raw(path, R"({"w": {"dtype": "F32", )", {});
    require_load_error(path, {"not valid JSON", "parse error"});
  }
  SECTION("header that is not an object") {
    write_raw(path, "[1, 2]", {});
    require_load_error(path, {"JSON array, not an object"});
  }
  SECTION("entry that is not an object") {
    write_raw(path, header_with("7"), {});
    require_load_error(path, {"tensor 'w'", "not an object"});
  }
  SECTION("missing dtype") {
    write_raw(path, header_with(R"({"shape": [1], "data_offsets": [0, 4]})"),
              std::vector<std::uint8_t>(4));
    require_load_error(path, {"tensor 'w'", "no string \"dtype\""});
  }
  SECTION("unknown dtype") {
    write_raw(path, header_with(R"({"dtype": "F42", "shape": [1], "data_offsets": [0, 4]})"),
              std::vector<std::uint8_t>(4));
    require_load_error(path, {"tensor 'w'", "unknown dtype 'F42'"});
  }
  SECTION("negative extent in the shape") {
    write_raw(path, header_with(R"({"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 4]})"),
              std::vector<std::uint8_t>(4));
    require_load_error(path, {"tensor 'w'", "[2,-1]", "non-negative integers"});
  }
  SECTION("data_offsets with one number") {
    write_raw(path, header_with(R"({"dtype": "F32", "shape": [1], "data_offsets": [4]})"),
              std::vector<std::uint8_t>(4));
    require_load_error(path, {"tensor 'w'", "\"data_offsets\" is [4]"});
  }
  SECTION("shape product times dtype size differs from the offsets' span") {
    write_raw(path, header_with(R"({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]})"),
              std::vector<std::uint8_t>(24));
    require_load_error(path,
                       {"tensor 'w'", "[2, 3]", "F32", "needs 24 bytes", "[0, 20]", "span 20"});
  }
  SECTION("shape product that overflows") {
    write_raw(path,
              header_with(R"({"dtype": "BF16", "shape": [4294967296, 4294967296], )"
                          R"("data_offsets": [0, 0]})"),
              {});
    require_load_error(path, {"tensor 'w'", "more than 2^64"});
  }
  SECTION("offsets past the data buffer") {
    write_raw(path, header_with(R"({"dtype": "F32", "shape": [6], "data_offsets": [0, 24]})"),
              std::vector<std::uint8_t>(16));
    require_load_error(path, {"tensor 'w'", "[0, 24]", "16-byte data buffer"});
  }
  SECTION("begin after end") {
    write_raw(path, header_with(R"({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]})"),
              std::vector<std::uint8_t>(16));
    require_load_error(path, {"tensor 'w'", "[8, 4]", "begin is after end"});
  }
  SECTION("overlapping tensors") {
    write_raw(path,
              R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
              R"( "b": {"dtype": "F16", "shape": [8], "data_offsets": [8, 24]}})",
              std::vector<std::uint8_t>(24));
    require_load_error(path,
                       {"'a' (data_offsets [0, 16])", "'b' (data_offsets [8, 24])", "overlap"});
  }
  SECTION("a file that does not exist") {
    require_load_error(dir / "absent.safetensors", {"cannot read the file size"});
  }
}

TEST_CASE("safetensors names a missing tensor and the file", "[tinyllm][safetensors]") {
  TempDir dir;
  write_safetensors(dir / "m.safetensors", {{"present", {"F32", {1}, {1.0F}}}});
  const SafetensorsFile file(dir / "m.safetensors");
  CHECK_FALSE(file.contains("absent"));
  CHECK_THROWS_MATCHES(file.read("absent"), LoadError,
                       MessageContains("m.safetensors") && MessageContains("no tensor 'absent'") &&
                           MessageContains("holds 1 tensors"));
  CHECK_THROWS_AS(file.info("absent"), LoadError);
}

TEST_CASE("safetensors read fails cleanly when the file shrank after opening",
          "[tinyllm][safetensors]") {
  TempDir dir;
  const auto path = dir / "s.safetensors";
  write_safetensors(path, {{"w", {"F32", {64}, std::vector<float>(64, 1.0F)}}});
  const SafetensorsFile file(path);
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 100);
  CHECK_THROWS_MATCHES(file.read("w"), LoadError, MessageContains("tensor 'w': cannot read bytes"));
}
