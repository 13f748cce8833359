// kvc/version.hpp — the library version (kept in sync with CMakeLists.txt's project()).
#pragma once

#define KVC_VERSION_MAJOR 0
#define KVC_VERSION_MINOR 1
#define KVC_VERSION_PATCH 0

namespace kvc {
inline constexpr int version_major = KVC_VERSION_MAJOR;
inline constexpr int version_minor = KVC_VERSION_MINOR;
inline constexpr int version_patch = KVC_VERSION_PATCH;
}  // namespace kvc
