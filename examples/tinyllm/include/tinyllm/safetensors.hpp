// tinyllm/safetensors.hpp — a validating reader for the .safetensors format.
//
// Layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
// N bytes of JSON, then the data buffer. The JSON maps each tensor name to
//   {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}
// with byte offsets relative to the start of the data buffer; "__metadata__" is ignored.
//
//   tinyllm::SafetensorsFile file("model.safetensors");   // reads and validates the header
//   std::vector<float> w = file.read("model.norm.weight");  // one tensor, widened to fp32
//
// The constructor reads only the header and checks all of it, so a malformed file fails
// before any tensor is used: a file shorter than 8 bytes, a header length past the end of the
// file, malformed JSON or a header that is not an object, an entry without a string dtype,
// an array shape of non-negative integers and two non-negative data_offsets, an unknown
// dtype, begin > end, end past the data buffer, shape product × dtype size ≠ end − begin,
// and two tensors whose byte ranges overlap. Gaps between tensors are accepted. Every
// failure is a tinyllm::LoadError naming the file, the tensor and the bad values.
//
// Every safetensors dtype is accepted in the header (so a checkpoint carrying, say, an I64
// buffer still opens); read() converts F32, F16 and BF16 to fp32 (f16/bf16 through
// Eigen::half / Eigen::bfloat16, exact) and throws LoadError for any other dtype, and for a
// name the file does not hold. read() reopens the file and reads just that tensor's bytes:
// memory is the fp32 output plus, for 16-bit tensors, the raw bytes of that one tensor.
// Assumes a little-endian host (static_assert).
#pragma once

#include <tinyllm/error.hpp>

// g++ 12's AVX-512 headers trip -Wmaybe-uninitialized wherever Eigen inlines them (GCC bug
// 105593); silenced for those system headers only, as kvc/simd/intrinsics.hpp does.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <Eigen/Core>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace tinyllm {

static_assert(std::endian::native == std::endian::little,
              "tinyllm reads little-endian safetensors files in place: little-endian hosts only");

// One entry of a safetensors header.
struct TensorInfo {
  std::string dtype;               // as written: "F32", "F16", "BF16", "I64", ...
  std::vector<std::size_t> shape;  // row-major; [] is a scalar
  std::size_t begin = 0;           // byte offsets into the data buffer, [begin, end)
  std::size_t end = 0;

  std::size_t elements() const noexcept {
    std::size_t n = 1;
    for (std::size_t extent : shape) n *= extent;
    return n;
  }
};

namespace detail {

// Bytes per element of every dtype the safetensors format defines; 0 = not a dtype.
inline std::size_t dtype_size(std::string_view dtype) noexcept {
  static constexpr std::array<std::pair<std::string_view, std::size_t>, 15> sizes{{
      {"F64", 8},
      {"F32", 4},
      {"F16", 2},
      {"BF16", 2},
      {"I64", 8},
      {"I32", 4},
      {"I16", 2},
      {"I8", 1},
      {"U64", 8},
      {"U32", 4},
      {"U16", 2},
      {"U8", 1},
      {"BOOL", 1},
      {"F8_E4M3", 1},
      {"F8_E5M2", 1},
  }};
  for (const auto& [name, size] : sizes) {
    if (name == dtype) return size;
  }
  return 0;
}

inline bool is_non_negative_integer(const nlohmann::json& value) {
  return value.is_number_unsigned() ||
         (value.is_number_integer() && value.get<std::int64_t>() >= 0);
}

}  // namespace detail

class SafetensorsFile {
 public:
  // Reads and validates the header of `path` (see the top of this file). Throws LoadError.
  explicit SafetensorsFile(std::filesystem::path path) : path_(std::move(path)) {
    std::error_code ec;
    const std::uintmax_t file_size = std::filesystem::file_size(path_, ec);
    if (ec) fail("cannot read the file size: {}", ec.message());
    std::ifstream in(path_, std::ios::binary);
    if (!in) fail("cannot open the file");
    if (file_size < 8) {
      fail("the file is {} bytes, shorter than the 8-byte header length", file_size);
    }
    std::array<unsigned char, 8> prefix{};
    in.read(reinterpret_cast<char*>(prefix.data()), 8);
    if (!in) fail("cannot read the 8-byte header length");
    std::uint64_t header_size = 0;
    for (std::size_t i = 0; i < 8; ++i) header_size |= std::uint64_t{prefix[i]} << (8 * i);
    if (header_size > file_size - 8) {
      fail("header length {} runs past the end of the file ({} bytes after the length prefix)",
           header_size, file_size - 8);
    }
    std::string header(static_cast<std::size_t>(header_size), '\0');
    in.read(header.data(), static_cast<std::streamsize>(header.size()));
    if (!in) fail("cannot read the {}-byte header", header_size);
    data_offset_ = 8 + static_cast<std::size_t>(header_size);
    data_size_ = static_cast<std::size_t>(file_size) - data_offset_;
    parse_header(header);
  }

  const std::filesystem::path& path() const noexcept { return path_; }
  // Every tensor of the header ("__metadata__" excluded), by name.
  const std::map<std::string, TensorInfo, std::less<>>& tensors() const noexcept {
    return tensors_;
  }
  std::size_t data_size() const noexcept { return data_size_; }

  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }

  // The header entry of `name`; LoadError if the file holds no such tensor.
  const TensorInfo& info(std::string_view name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      fail("no tensor '{}' (the file holds {} tensors)", name, tensors_.size());
    }
    return it->second;
  }

  // Tensor `name` widened to fp32, row-major, into `out` (exactly info(name).elements()
  // floats: std::invalid_argument otherwise). LoadError for an absent tensor, a dtype other
  // than F32/F16/BF16, or a file that shrank since the header was read.
  void read(std::string_view name, std::span<float> out) const {
    const TensorInfo& tensor = info(name);
    if (out.size() != tensor.elements()) {
      throw std::invalid_argument(fmt::format("{}: read '{}': output has {} floats, tensor has {}",
                                              path_.string(), name, out.size(), tensor.elements()));
    }
    if (tensor.dtype != "F32" && tensor.dtype != "F16" && tensor.dtype != "BF16") {
      fail("tensor '{}' has dtype {}; tinyllm reads F32, F16 and BF16", name, tensor.dtype);
    }
    std::ifstream in(path_, std::ios::binary);
    if (!in) fail("cannot reopen the file to read tensor '{}'", name);
    in.seekg(static_cast<std::streamoff>(data_offset_ + tensor.begin));
    const std::size_t bytes = tensor.end - tensor.begin;
    if (tensor.dtype == "F32") {
      in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(bytes));
    } else {
      std::vector<std::uint16_t> raw(out.size());
      in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(bytes));
      if (tensor.dtype == "F16") {
        std::transform(raw.begin(), raw.end(), out.begin(), [](std::uint16_t bits) {
          return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
        });
      } else {
        std::transform(raw.begin(), raw.end(), out.begin(), [](std::uint16_t bits) {
          return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits));
        });
      }
    }
    if (!in)
      fail("tensor '{}': cannot read bytes [{}, {}) of the data buffer", name, tensor.begin,
           tensor.end);
  }

  std::vector<float> read(std::string_view name) const {
    std::vector<float> out(info(name).elements());
    read(name, out);
    return out;
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) const {
    throw LoadError(path_.string() + ": " + fmt::format(format, std::forward<Args>(args)...));
  }

  void parse_header(const std::string& text) {
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      fail("the header is not valid JSON: {}", e.what());
    }
    if (!header.is_object()) fail("the header is a JSON {}, not an object", header.type_name());

    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") continue;
      tensors_.emplace(name, parse_entry(name, entry));
    }

    // Byte ranges must not overlap (empty tensors occupy no bytes).
    std::vector<std::pair<const std::string*, const TensorInfo*>> order;
    for (const auto& [name, tensor] : tensors_) {
      if (tensor.end > tensor.begin) order.emplace_back(&name, &tensor);
    }
    std::sort(order.begin(), order.end(),
              [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
    for (std::size_t i = 1; i < order.size(); ++i) {
      const auto& [previous_name, previous] = order[i - 1];
      const auto& [name, tensor] = order[i];
      if (tensor->begin < previous->end) {
        fail("tensors '{}' (data_offsets [{}, {}]) and '{}' (data_offsets [{}, {}]) overlap",
             *previous_name, previous->begin, previous->end, *name, tensor->begin, tensor->end);
      }
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& entry) const {
    if (!entry.is_object())
      fail("tensor '{}': the entry is a JSON {}, not an object", name, entry.type_name());
    TensorInfo tensor;
    const auto dtype = entry.find("dtype");
    if (dtype == entry.end() || !dtype->is_string()) {
      fail("tensor '{}': no string \"dtype\"", name);
    }
    tensor.dtype = dtype->get<std::string>();
    const std::size_t element_size = detail::dtype_size(tensor.dtype);
    if (element_size == 0) fail("tensor '{}' has unknown dtype '{}'", name, tensor.dtype);

    const auto shape = entry.find("shape");
    if (shape == entry.end() || !shape->is_array() ||
        !std::all_of(shape->begin(), shape->end(), detail::is_non_negative_integer)) {
      fail("tensor '{}': \"shape\" is {}, not an array of non-negative integers", name,
           shape == entry.end() ? std::string("missing") : shape->dump());
    }
    std::size_t bytes = element_size;
    bool overflow = false;
    for (const auto& extent : *shape) {
      tensor.shape.push_back(extent.get<std::size_t>());
      overflow = overflow || __builtin_mul_overflow(bytes, tensor.shape.back(), &bytes);
    }

    const auto offsets = entry.find("data_offsets");
    if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
        !std::all_of(offsets->begin(), offsets->end(), detail::is_non_negative_integer)) {
      fail("tensor '{}': \"data_offsets\" is {}, not [begin, end] (non-negative integers)", name,
           offsets == entry.end() ? std::string("missing") : offsets->dump());
    }
    tensor.begin = (*offsets)[0].get<std::size_t>();
    tensor.end = (*offsets)[1].get<std::size_t>();
    if (tensor.begin > tensor.end) {
      fail("tensor '{}' has data_offsets [{}, {}]: begin is after end", name, tensor.begin,
           tensor.end);
    }
    if (tensor.end > data_size_) {
      fail("tensor '{}' has data_offsets [{}, {}], past the end of the {}-byte data buffer", name,
           tensor.begin, tensor.end, data_size_);
    }
    if (overflow || bytes != tensor.end - tensor.begin) {
      fail(
          "tensor '{}': shape {} of {} ({} bytes each) needs {} bytes, data_offsets [{}, {}] "
          "span {}",
          name, tensor.shape, tensor.dtype, element_size,
          overflow ? std::string("more than 2^64") : std::to_string(bytes), tensor.begin,
          tensor.end, tensor.end - tensor.begin);
    }
    return tensor;
  }

  std::filesystem::path path_;
  std::size_t data_offset_ = 0;  // bytes before the data buffer: 8 + header length
  std::size_t data_size_ = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
};

}  // namespace tinyllm
