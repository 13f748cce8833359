// Tests of kvc/core/element.hpp and kvc/version.hpp.
#include <kvc/core/element.hpp>
#include <kvc/version.hpp>

#include <fmt/format.h>

#include <catch2/catch.hpp>

static_assert(kvc::Element<float> && kvc::Element<Eigen::half> && kvc::Element<Eigen::bfloat16>);
static_assert(!kvc::Element<double> && !kvc::Element<int> && !kvc::Element<const float>);

TEST_CASE("element names and the library version", "[element]") {
  CHECK(kvc::element_name<float>() == "f32");
  CHECK(kvc::element_name<Eigen::half>() == "f16");
  CHECK(kvc::element_name<Eigen::bfloat16>() == "bf16");
#ifdef KVC_CMAKE_VERSION
  // The header's version must agree with project(kvc VERSION ...) in CMakeLists.txt.
  CHECK(fmt::format("{}.{}.{}", kvc::version_major, kvc::version_minor, kvc::version_patch) ==
        KVC_CMAKE_VERSION);
#endif
  CHECK(kvc::version_major == KVC_VERSION_MAJOR);
}
